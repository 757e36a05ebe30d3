use std::sync::Arc;
use dinovmf::data::{CropConfig, Image, Loader, Synthetic, SyntheticConfig, Split, IMAGENET_MEAN, IMAGENET_STD};
fn main() {
    let ds = Arc::new(Synthetic::new(SyntheticConfig::default(), Split::Train));
    let crops = CropConfig::for_image_size(32, 4);
    let loader = Loader::new(ds, crops, 8, 0, 1, 2);
    let b = loader.batch(0, 0).unwrap();
    let (g, l) = (b.global_size, b.local_size);
    let s = 3; // upscale
    let cols = 6; let rows = 8;
    let mut img = Image::new(cols * g * s, rows * g * s);
    let put = |img: &mut Image, data: &[f32], size: usize, r: usize, c: usize| {
        for y in 0..size*s { for x in 0..size*s {
            for ch in 0..3 {
                let v = data[ch*size*size + (y/s)*size + x/s] * IMAGENET_STD[ch] + IMAGENET_MEAN[ch];
                let o = 3 * ((r*g*s + y) * img.width + c*g*s + x) + ch;
                img.rgb[o] = (v.clamp(0.0,1.0)*255.0) as u8;
            }
        }}
    };
    for r in 0..rows {
        for gi in 0..2 { let n = 3*g*g; let d = &b.global_crop(gi)[r*n..(r+1)*n]; put(&mut img, d, g, r, gi); }
        for li in 0..4 { let n = 3*l*l; let d = &b.local_crop(li)[r*n..(r+1)*n]; put(&mut img, d, l, r, 2+li); }
    }
    img.save(std::path::Path::new("/tmp/crops.png")).unwrap();
    println!("labels {:?}", b.labels);
}
