//! `root/<class>/<image>.png|jpg|jpeg`, the torchvision `ImageFolder` layout.
//!
//! Bad files under [`OnError::Skip`] are handled in two places:
//! - at open time every file's header is read (in parallel; cheap, no pixel decoding): files whose
//!   format or size cannot be read are reported once on stderr and left out of the dataset;
//! - a file whose header is fine but whose pixel data fails to decode at load time is reported once
//!   and replaced, deterministically, by the next decodable image of the same class (cyclic order), so
//!   `label(i)` stays right and the batch is still a pure function of its indices.
//!
//! - a class none of whose files decodes gives a blank grey image for its samples (reported once),
//!   so a non-strict run never stops mid-training.
//!
//! Under [`OnError::Stop`] either case is an error naming the file.
//!
//! A held-out folder opened with [`ImageFolder::open_with_classes`] labels its images by class
//! *name* with the training folder's indices: a held-out class the training folder lacks is an
//! error naming it (matching by sorted position would silently mislabel everything).
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;

use super::{DataError, Dataset, Image};

/// Side of the blank image standing in for a class with no decodable file.
const BLANK_SIDE: usize = 64;

/// What to do with a file that cannot be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// Report it on stderr (once) and leave it out / substitute it; see the module note.
    Skip,
    /// Fail with an error naming the file.
    Stop,
}

/// Images in class folders.
#[derive(Debug)]
pub struct ImageFolder {
    root: PathBuf,
    policy: OnError,
    classes: Vec<String>,
    files: Vec<PathBuf>,
    labels: Vec<usize>,
    /// Per class, the sample indices of that class in order (for substitution).
    members: Vec<Vec<usize>>,
    skipped_at_open: usize,
    reported: Mutex<HashSet<usize>>,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        .unwrap_or(false)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        out.push(entry.map_err(|e| DataError::io(dir, e))?.path());
    }
    out.sort();
    Ok(out)
}

/// Reads only the header: format and dimensions.
fn check_header(path: &Path) -> Result<(), DataError> {
    let corrupt = |message: String| DataError::CorruptImage {
        path: path.to_path_buf(),
        message,
    };
    let reader = image::ImageReader::open(path)
        .map_err(|e| DataError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))?;
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| corrupt(e.to_string()))?;
    if w == 0 || h == 0 {
        return Err(corrupt(format!("image has size {w}x{h}")));
    }
    Ok(())
}

/// Decodes a whole file to RGB8.
pub fn decode_file(path: &Path) -> Result<Image, DataError> {
    let corrupt = |message: String| DataError::CorruptImage {
        path: path.to_path_buf(),
        message,
    };
    let img = image::ImageReader::open(path)
        .map_err(|e| DataError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))?
        .decode()
        .map_err(|e| corrupt(e.to_string()))?
        .into_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(corrupt(format!("image has size {w}x{h}")));
    }
    Ok(Image {
        width: w,
        height: h,
        rgb: img.into_raw(),
    })
}

impl ImageFolder {
    /// Scans `root`; classes are the sorted names of its sub-folders that hold at least one image
    /// (files directly under `root` and deeper folders are ignored).
    pub fn open(root: impl AsRef<Path>, policy: OnError) -> Result<Self, DataError> {
        Self::scan(root.as_ref(), policy, None)
    }

    /// Scans `root` as a held-out split of a training set with classes `train_classes`: labels
    /// are those classes' indices, by name; a class not among them is an error naming it.
    pub fn open_with_classes(
        root: impl AsRef<Path>,
        policy: OnError,
        train_classes: &[String],
    ) -> Result<Self, DataError> {
        Self::scan(root.as_ref(), policy, Some(train_classes))
    }

    /// The class names, in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    fn scan(
        root: &Path,
        policy: OnError,
        train_classes: Option<&[String]>,
    ) -> Result<Self, DataError> {
        let root = root.to_path_buf();
        if !root.is_dir() {
            return Err(DataError::NotFound {
                path: root,
                what: "image folder root must be a directory".into(),
            });
        }
        let mut classes: Vec<String> = train_classes.map(<[String]>::to_vec).unwrap_or_default();
        let mut candidates: Vec<(PathBuf, usize)> = Vec::new();
        for dir in sorted_entries(&root)? {
            if !dir.is_dir() {
                continue;
            }
            let images: Vec<PathBuf> = sorted_entries(&dir)?
                .into_iter()
                .filter(|p| p.is_file() && is_image(p))
                .collect();
            if images.is_empty() {
                continue;
            }
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let c = match train_classes {
                Some(known) => known.iter().position(|k| *k == name).ok_or_else(|| {
                    DataError::UnknownClass {
                        path: dir.clone(),
                        class: name.clone(),
                        known: known.join(", "),
                    }
                })?,
                None => {
                    classes.push(name);
                    classes.len() - 1
                }
            };
            candidates.extend(images.into_iter().map(|p| (p, c)));
        }
        if candidates.is_empty() {
            return Err(DataError::EmptyFolder { path: root });
        }
        let checks: Vec<Result<(), DataError>> = candidates
            .par_iter()
            .map(|(p, _)| check_header(p))
            .collect();
        let mut files = Vec::with_capacity(candidates.len());
        let mut labels = Vec::with_capacity(candidates.len());
        let mut skipped = 0;
        for ((path, c), check) in candidates.into_iter().zip(checks) {
            match (check, policy) {
                (Ok(()), _) => {
                    files.push(path);
                    labels.push(c);
                }
                (Err(e), OnError::Stop) => return Err(e),
                (Err(e), OnError::Skip) => {
                    eprintln!("warning: skipping {e}");
                    skipped += 1;
                }
            }
        }
        if files.is_empty() {
            return Err(DataError::EmptyFolder { path: root });
        }
        // Classes whose every file was bad keep their name and index (labels stay stable), but have
        // no members.
        let mut members = vec![Vec::new(); classes.len()];
        for (i, &c) in labels.iter().enumerate() {
            members[c].push(i);
        }
        Ok(ImageFolder {
            root,
            policy,
            classes,
            files,
            labels,
            members,
            skipped_at_open: skipped,
            reported: Mutex::new(HashSet::new()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, i: usize) -> Option<&Path> {
        self.files.get(i).map(|p| p.as_path())
    }

    /// Files left out at open time because their header could not be read.
    pub fn skipped_at_open(&self) -> usize {
        self.skipped_at_open
    }

    /// True the first time it is called for class `c`.
    fn reported_class(&self, c: usize) -> bool {
        let mut seen = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        seen.insert(usize::MAX - c)
    }

    fn report_once(&self, i: usize, e: &DataError) {
        let mut seen = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        if seen.insert(i) {
            eprintln!("warning: substituting another image of the same class for {e}");
        }
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn class_name(&self, c: usize) -> String {
        self.classes
            .get(c)
            .cloned()
            .unwrap_or_else(|| format!("class{c}"))
    }

    fn label(&self, i: usize) -> usize {
        self.labels.get(i).copied().unwrap_or(0)
    }

    fn load(&self, i: usize) -> Result<Image, DataError> {
        let path = self.files.get(i).ok_or(DataError::OutOfRange {
            index: i,
            len: self.files.len(),
        })?;
        let first = match decode_file(path) {
            Ok(img) => return Ok(img),
            Err(e) => e,
        };
        if self.policy == OnError::Stop {
            return Err(first);
        }
        self.report_once(i, &first);
        let class = self.labels[i];
        let members = &self.members[class];
        let pos = members.iter().position(|&m| m == i).unwrap_or(0);
        for k in 1..members.len() {
            let j = members[(pos + k) % members.len()];
            match decode_file(&self.files[j]) {
                Ok(img) => return Ok(img),
                Err(e) => self.report_once(j, &e),
            }
        }
        // No file of the class decodes: a blank image keeps the run going (reported once).
        if self.reported_class(class) {
            eprintln!(
                "warning: no image of class '{}' decodes; its samples are a blank grey image",
                self.class_name(class)
            );
        }
        Ok(Image {
            width: BLANK_SIDE,
            height: BLANK_SIDE,
            rgb: vec![128; 3 * BLANK_SIDE * BLANK_SIDE],
        })
    }

    fn describe(&self) -> String {
        format!(
            "image folder {}: {} images, {} classes{}",
            self.root.display(),
            self.files.len(),
            self.classes.len(),
            if self.skipped_at_open > 0 {
                format!(", {} unreadable files skipped", self.skipped_at_open)
            } else {
                String::new()
            }
        )
    }
}
