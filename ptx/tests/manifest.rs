//! The manifest (what the host launches) must describe the committed `dinovmf.ptx` exactly:
//! the same entry points, each with the same parameters in the same order and PTX types.
use dinovmf_ptx::manifest::{self, SmemKind};
use std::collections::BTreeMap;

fn ptx_type(rust: &str) -> &'static str {
    match rust {
        "f32" => ".f32",
        "f64" => ".f64",
        "u32" => ".u32",
        "u64" => ".u64",
        t if t.starts_with('*') => ".u64",
        t => panic!("unexpected parameter type {t}"),
    }
}

/// `.entry name(.param .T name_param_0, ...)` of every kernel in the PTX text.
fn entries(ptx: &str) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    let mut lines = ptx.lines();
    while let Some(l) = lines.next() {
        let Some(rest) = l.strip_prefix(".visible .entry ") else {
            continue;
        };
        let name = rest.trim_end_matches('(').to_string();
        let mut params = Vec::new();
        for p in lines.by_ref() {
            let p = p.trim();
            if p.starts_with(')') {
                break;
            }
            let ty = p.split_whitespace().nth(1).expect("param type").to_string();
            params.push(ty);
        }
        out.insert(name, params);
    }
    out
}

#[test]
fn manifest_matches_committed_ptx() {
    let ptx = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/dinovmf.ptx"))
        .expect("ptx/dinovmf.ptx (run scripts/build-ptx.sh)");
    assert!(
        !ptx.contains(".extern .func"),
        "the module must be self-contained"
    );
    let found = entries(&ptx);
    let listed: Vec<_> = manifest::all().collect();
    assert_eq!(
        found.len(),
        listed.len(),
        "entry count: ptx {:?}",
        found.keys()
    );
    for k in listed {
        let params = found
            .get(k.name)
            .unwrap_or_else(|| panic!("{} missing from the PTX", k.name));
        let want: Vec<_> = k.params.iter().map(|p| ptx_type(p.ty)).collect();
        assert_eq!(params, &want, "{}: parameter types", k.name);
        assert!(
            k.block % 32 == 0 && k.block <= 1024,
            "{}: block {}",
            k.name,
            k.block
        );
        // The kernel's body references exactly the shared array the manifest names.
        let body = ptx
            .split(".visible .entry ")
            .find(|c| c.starts_with(&format!("{}(", k.name)))
            .unwrap();
        let uses = |sym: &str| body.contains(sym);
        let want = (k.smem == SmemKind::Small, k.smem == SmemKind::Gemm);
        assert_eq!(
            (uses("dinovmf_smem_small"), uses("dinovmf_smem_gemm")),
            want,
            "{}: shared memory use differs from the manifest ({:?})",
            k.name,
            k.smem
        );
    }
}
