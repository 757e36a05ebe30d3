//! Production shapes on the simulator (`--features gpu-sim`): the kernels at ViT-S/16 and
//! ViT-B/16 with K = 65536 and batch 64, only the corner blocks launched (first, last and
//! partial tiles), sampled entries against f64; and the host's launch checks (sizes past 2^32,
//! grid limits, u32 parameters) returning errors that name the kernel and the sizes.
#![cfg(feature = "gpu-sim")]
use dinovmf::backend::cuda::device::{check_launch, u32_of, Arg, Gpu};
use dinovmf::backend::cuda::sim::{SimDevice, SimOptions};
use dinovmf::backend::cuda::verify::{print_rows, run_large, LargeShape, VIT_B16, VIT_S16};
use dinovmf_ptx::manifest;

fn corners(shape: &LargeShape) {
    let mut gpu = Gpu::new(SimDevice::with_options(SimOptions::corners()));
    let rows = run_large(&mut gpu, shape, 3);
    let mut out = Vec::new();
    print_rows(&rows, &mut out).unwrap();
    let table = String::from_utf8(out).unwrap();
    println!("{table}");
    assert!(rows.len() >= 8, "{table}");
    assert!(rows.iter().all(|r| r.ok), "{table}");
    let mut kernels = vec![
        "gemm_nt_f32",
        "gemm_nn_f32",
        "gemm_tn_f32",
        "layernorm_forward",
        "layernorm_backward_dx",
        "layernorm_backward_params",
        "softmax_rows",
        "softmax_backward_rows",
        "gemm_logits_f32",
        "gather_rows",
        "xent_masked",
        "gelu_forward",
        "gelu_backward",
    ];
    if shape.head {
        kernels.extend([
            "lse_combine",
            "teacher_targets",
            "teacher_stat",
            "xent_columns",
            "l2norm_forward",
            "row_entropy",
        ]);
    }
    for k in kernels {
        assert!(rows.iter().any(|r| r.kernel == k), "{k} not checked");
    }
    // The six batched attention GEMMs, at both crop sizes.
    for what in [
        "S=QK^T",
        "O=PV",
        "dP=dO V^T",
        "dV=P^T dO",
        "dQ=dS K",
        "dK=dS^T Q",
    ] {
        let n = rows.iter().filter(|r| r.size.contains(what)).count();
        assert_eq!(n, 2, "attention {what}: {n} rows");
    }
}

#[test]
fn vit_s16_kernels_at_k65536_batch64_on_corner_blocks() {
    corners(&VIT_S16);
}

#[test]
fn vit_b16_kernels_at_k65536_batch64_on_corner_blocks() {
    corners(&VIT_B16);
}

/// The words and arguments of a launch of `name` with the given sizes and every pointer
/// standing for a buffer of `len(pointer)` elements (no memory behind them: only the checks run).
fn launch_args(
    name: &str,
    sizes: &[(&str, u64)],
    len: &dyn Fn(&str) -> usize,
) -> (Vec<Arg>, Vec<u64>) {
    let k = manifest::kernel(name).unwrap();
    let mut args = Vec::new();
    for p in k.params {
        args.push(if let Some(elem) = p.ty.strip_prefix('*') {
            Arg::Ptr {
                addr: 4096,
                elem: elem.rsplit(' ').next().unwrap(),
                len: len(p.name),
            }
        } else if p.ty == "f32" {
            Arg::F32(1.0)
        } else if p.ty == "f64" {
            Arg::F64(1.0)
        } else {
            let v = sizes
                .iter()
                .find(|s| s.0 == p.name)
                .map(|s| s.1)
                .unwrap_or(1);
            if p.ty == "u64" {
                Arg::U64(v)
            } else {
                u32_of(v as usize)
            }
        });
    }
    let words = args
        .iter()
        .zip(k.params)
        .map(|(a, p)| a.word(name, p.name, p.ty))
        .collect::<anyhow::Result<Vec<_>>>()
        .unwrap();
    (args, words)
}

#[test]
fn ibot_patch_targets_past_2_32_elements_are_counted_exactly() {
    // The iBOT teacher's patch targets: 2 global crops x batch x 196 patches rows of K = 65536.
    // From batch 168 on (2^32 / (2 * 196 * 65536) = 167.2) that is past 2^32 elements.
    let (t_rows, k, m) = (2 * 168 * 196u64, 65536u64, 1000u64);
    assert!(t_rows * k > u32::MAX as u64);
    let wrapped = (t_rows * k) as u32 as usize;
    let sizes = [("t_rows", t_rows), ("k", k), ("m", m)];
    let kern = manifest::kernel("xent_masked").unwrap();
    let grid = [k.div_ceil(256) as u32, 1, 1];
    // A buffer as long as a u32 product would have said: refused, naming the sizes.
    let (args, words) = launch_args("xent_masked", &sizes, &|p| match p {
        "p_t" => wrapped,
        "dots" => (m * k) as usize,
        "loss_part" => 256,
        "dr" | "scale" | "bias" | "dbias_dr" => k as usize,
        _ => m as usize,
    });
    let e = check_launch(kern, &args, &words, grid)
        .unwrap_err()
        .to_string();
    assert!(e.contains("xent_masked") && e.contains("p_t"), "{e}");
    assert!(e.contains(&format!("{}", t_rows * k)), "{e}");
    assert!(e.contains("t_rows=65856") && e.contains("k=65536"), "{e}");
    // The real length passes.
    let (args, words) = launch_args("xent_masked", &sizes, &|p| match p {
        "p_t" => (t_rows * k) as usize,
        "dots" => (m * k) as usize,
        "loss_part" => 256,
        "dr" | "scale" | "bias" | "dbias_dr" => k as usize,
        _ => m as usize,
    });
    check_launch(kern, &args, &words, grid).unwrap();
}

#[test]
fn grid_y_past_65535_is_an_error_naming_the_kernel() {
    let nseg = 70_000u64;
    let kern = manifest::kernel("scale_segments").unwrap();
    let (args, words) = launch_args("scale_segments", &[("x_len", 1 << 20)], &|p| match p {
        "x" => 1 << 20,
        _ => nseg as usize,
    });
    let e = check_launch(kern, &args, &words, [4, nseg as u32, 1])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("scale_segments") && e.contains("65535") && e.contains("along y"),
        "{e}"
    );
    // Within the limits: fine.
    check_launch(kern, &args, &words, [4, 65535, 1]).unwrap();
}

#[test]
fn a_size_past_u32_is_an_error_not_a_panic() {
    let mut gpu = Gpu::new(SimDevice::new());
    let x = gpu.alloc::<f32>(16).unwrap();
    let e = gpu
        .launch("fill", &[x.into(), 0.0f32.into(), u32_of(1usize << 33)])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("fill") && e.contains("8589934592") && e.contains("u32"),
        "{e}"
    );
}

#[test]
fn a_buffer_shorter_than_its_extent_is_refused_before_launch() {
    let mut gpu = Gpu::new(SimDevice::new());
    let (y, x) = (
        gpu.alloc::<f32>(100).unwrap(),
        gpu.alloc::<f32>(99).unwrap(),
    );
    let e = gpu
        .launch("gelu_forward", &[y.into(), x.into(), u32_of(100)])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("gelu_forward")
            && e.contains("parameter x needs n = 100")
            && e.contains("holds 99"),
        "{e}"
    );
}

/// The whole per-kernel verification with blocks and the threads of each phase in shuffled
/// orders: no kernel of dinovmf.ptx depends on the order the simulator runs them in (a GPU
/// guarantees none).
#[test]
fn every_kernel_verifies_with_blocks_and_threads_shuffled() {
    for seed in [1, 2] {
        let mut gpu = Gpu::new(SimDevice::with_options(SimOptions::shuffled(seed)));
        let rows = dinovmf::backend::cuda::verify::run_all(&mut gpu, seed);
        let mut out = Vec::new();
        print_rows(&rows, &mut out).unwrap();
        assert!(
            dinovmf::backend::cuda::verify::verdict(&rows).is_ok(),
            "seed {seed}:\n{}",
            String::from_utf8(out).unwrap()
        );
    }
}
