use dinovmf::backend::Net;
use dinovmf::train::{self, state, LossKind, TrainConfig};
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut cfg = TrainConfig::preset("small32", LossKind::Vmf).unwrap();
    let mut st = state::init_state(&cfg);
    if args.len() > 1 {
        let (s, _, c, _) = state::load_checkpoint(std::path::Path::new(&args[1])).unwrap();
        st = s; cfg = c;
    }
    let mut be = state::cpu_backend(&cfg).unwrap();
    be.set_state(&st).unwrap();
    let data = train::open_data(&cfg.data, 32, dinovmf::data::OnError::Skip).unwrap();
    let (f, _l, d) = train::dataset_features(be.as_mut(), data.test.as_ref().unwrap(), 32, Net::Teacher).unwrap();
    let n = f.len() / d;
    let mut g = f.clone();
    dinovmf::eval::knn::l2_normalise_rows(&mut g, d);
    let mut mean = vec![0f64; d];
    for r in g.chunks(d) { for (m, x) in mean.iter_mut().zip(r) { *m += *x as f64 / n as f64; } }
    let mn: f64 = mean.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut cs = 0.0; let mut cnt = 0;
    for i in 0..200 { for j in 0..i { let a=&g[i*d..(i+1)*d]; let b=&g[j*d..(j+1)*d]; cs += a.iter().zip(b).map(|(x,y)| (*x as f64)*(*y as f64)).sum::<f64>(); cnt+=1; } }
    println!("n {n} d {d} |mean of unit features| {mn:.4} mean pairwise cos {:.4}", cs / cnt as f64);
}
