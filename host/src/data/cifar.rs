//! CIFAR-10 / CIFAR-100 in their binary distribution format.
//!
//! CIFAR-10: `data_batch_1.bin` .. `data_batch_5.bin` (train), `test_batch.bin`; records of 1 label
//! byte + 3072 pixel bytes (three 32x32 planes R, G, B). CIFAR-100: `train.bin`, `test.bin`; records
//! of 2 label bytes (coarse, fine) + 3072; the fine label (100 classes) is used. The whole split is
//! read into memory (150 MB for CIFAR-10 train), which makes `load` a copy.
use std::path::{Path, PathBuf};

use super::{DataError, Dataset, Image, Split};

const PIXELS: usize = 3 * 32 * 32;

const CIFAR10_NAMES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

const CIFAR100_NAMES: &str = "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle \
bowl boy bridge bus butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud \
cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house \
kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain \
mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy \
porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail \
snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger \
tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm";

/// One split of CIFAR-10 or CIFAR-100, held in memory.
#[derive(Debug)]
pub struct Cifar {
    dir: PathBuf,
    variant: usize,
    split: Split,
    names: Vec<String>,
    /// CHW planes, `PIXELS` bytes per sample.
    pixels: Vec<u8>,
    labels: Vec<u16>,
}

/// Which variant lives in `dir`, if any.
fn detect(dir: &Path) -> Option<usize> {
    if dir.join("data_batch_1.bin").is_file() || dir.join("test_batch.bin").is_file() {
        Some(10)
    } else if dir.join("train.bin").is_file() || dir.join("test.bin").is_file() {
        Some(100)
    } else {
        None
    }
}

/// Class names from the distribution's text file when present, else the published lists.
fn class_names(dir: &Path, variant: usize) -> Vec<String> {
    let (file, fallback): (&str, Vec<&str>) = if variant == 10 {
        ("batches.meta.txt", CIFAR10_NAMES.to_vec())
    } else {
        (
            "fine_label_names.txt",
            CIFAR100_NAMES.split_whitespace().collect(),
        )
    };
    if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
        let names: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        if names.len() == variant {
            return names;
        }
    }
    fallback.into_iter().map(String::from).collect()
}

impl Cifar {
    /// Opens the split from `path`: the folder holding the .bin files, or a folder containing the
    /// extracted `cifar-10-batches-bin/` or `cifar-100-binary/`. CIFAR-10 wins if both are present.
    pub fn open(path: impl AsRef<Path>, split: Split) -> Result<Self, DataError> {
        let path = path.as_ref();
        let found = [
            path.to_path_buf(),
            path.join("cifar-10-batches-bin"),
            path.join("cifar-100-binary"),
        ]
        .into_iter()
        .find_map(|d| detect(&d).map(|v| (d, v)));
        let Some((dir, variant)) = found else {
            return Err(DataError::NotFound {
                path: path.to_path_buf(),
                what: "no CIFAR binaries (data_batch_1.bin/test_batch.bin for CIFAR-10, \
                       train.bin/test.bin for CIFAR-100)"
                    .into(),
            });
        };
        let files: Vec<PathBuf> = match (variant, split) {
            (10, Split::Train) => (1..=5)
                .map(|k| dir.join(format!("data_batch_{k}.bin")))
                .collect(),
            (10, Split::Test) => vec![dir.join("test_batch.bin")],
            (_, Split::Train) => vec![dir.join("train.bin")],
            (_, Split::Test) => vec![dir.join("test.bin")],
        };
        let label_bytes = if variant == 10 { 1 } else { 2 };
        let record = label_bytes + PIXELS;
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for file in &files {
            let bytes = std::fs::read(file).map_err(|e| DataError::io(file, e))?;
            if bytes.is_empty() || bytes.len() % record != 0 {
                return Err(DataError::CifarSize {
                    path: file.clone(),
                    size: bytes.len() as u64,
                    record,
                    variant,
                });
            }
            pixels.reserve(bytes.len() / record * PIXELS);
            for (r, rec) in bytes.chunks_exact(record).enumerate() {
                let label = rec[label_bytes - 1] as usize;
                if label >= variant {
                    return Err(DataError::CifarLabel {
                        path: file.clone(),
                        record: r,
                        label,
                        variant,
                        classes: variant,
                    });
                }
                labels.push(label as u16);
                pixels.extend_from_slice(&rec[label_bytes..]);
            }
        }
        Ok(Cifar {
            names: class_names(&dir, variant),
            dir,
            variant,
            split,
            pixels,
            labels,
        })
    }

    /// 10 or 100.
    pub fn variant(&self) -> usize {
        self.variant
    }
}

impl Dataset for Cifar {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn num_classes(&self) -> usize {
        self.variant
    }

    fn class_name(&self, c: usize) -> String {
        self.names
            .get(c)
            .cloned()
            .unwrap_or_else(|| format!("class{c}"))
    }

    fn label(&self, i: usize) -> usize {
        self.labels.get(i).map(|&l| l as usize).unwrap_or(0)
    }

    fn load(&self, i: usize) -> Result<Image, DataError> {
        if i >= self.labels.len() {
            return Err(DataError::OutOfRange {
                index: i,
                len: self.labels.len(),
            });
        }
        let planes = &self.pixels[i * PIXELS..(i + 1) * PIXELS];
        let n = 32 * 32;
        let mut rgb = Vec::with_capacity(PIXELS);
        for p in 0..n {
            rgb.extend_from_slice(&[planes[p], planes[n + p], planes[2 * n + p]]);
        }
        Ok(Image {
            width: 32,
            height: 32,
            rgb,
        })
    }

    fn describe(&self) -> String {
        format!(
            "CIFAR-{} {} from {}: {} images",
            self.variant,
            if self.split == Split::Train {
                "train"
            } else {
                "test"
            },
            self.dir.display(),
            self.labels.len()
        )
    }
}
