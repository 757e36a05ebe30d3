use dinovmf::data::{Dataset, Image, Synthetic, SyntheticConfig, Split};
fn main() {
    let ds = Synthetic::new(SyntheticConfig::default(), Split::Train);
    let (cols, rows, s) = (12usize, 10usize, 32usize);
    let mut img = Image::new(cols * s * 3, rows * s * 3);
    for r in 0..rows { for c in 0..cols {
        let i = c * 10 + r; // label = i % 10 = r
        let im = ds.load(i).unwrap();
        for y in 0..s*3 { for x in 0..s*3 {
            let px = im.pixel(x/3, y/3);
            let o = 3 * ((r*s*3 + y) * img.width + c*s*3 + x);
            img.rgb[o..o+3].copy_from_slice(&px);
        }}
    }}
    img.save(std::path::Path::new("/tmp/grid.png")).unwrap();
}
