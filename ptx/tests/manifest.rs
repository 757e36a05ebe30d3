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
        let kinds = [
            (SmemKind::Small, "dinovmf_smem_small"),
            (SmemKind::Gemm, "dinovmf_smem_gemm"),
            (SmemKind::Tc, "dinovmf_smem_tc"),
            (SmemKind::Att, "dinovmf_smem_att"),
            (SmemKind::AttBwd, "dinovmf_smem_dyn"),
        ];
        let want: Vec<bool> = kinds.iter().map(|(kind, _)| k.smem == *kind).collect();
        assert_eq!(
            kinds.iter().map(|(_, sym)| uses(sym)).collect::<Vec<_>>(),
            want,
            "{}: shared memory use differs from the manifest ({:?})",
            k.name,
            k.smem
        );
    }
}

/// Every pointer parameter has exactly one extent, and an extent names only size parameters of
/// its kernel or the launch's grid: the host checks each buffer against it.
#[test]
fn every_pointer_has_one_extent_over_size_parameters() {
    for k in manifest::all() {
        let mut seen = Vec::new();
        for item in k.extents.split(';').map(str::trim) {
            let (p, expr) = item
                .split_once(':')
                .unwrap_or_else(|| panic!("{}: extent '{item}'", k.name));
            let p = p.trim();
            let param = k
                .params
                .iter()
                .find(|q| q.name == p)
                .unwrap_or_else(|| panic!("{}: extent for unknown parameter {p}", k.name));
            assert!(
                param.ty.starts_with('*'),
                "{}: {p} is not a pointer",
                k.name
            );
            assert!(!seen.contains(&p), "{}: two extents for {p}", k.name);
            seen.push(p);
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| !w.is_empty() && !w.chars().next().unwrap().is_ascii_digit())
            {
                let ok = name == "ceil"
                    || name.starts_with("grid_")
                    || k.params
                        .iter()
                        .any(|q| q.name == name && (q.ty == "u32" || q.ty == "u64"));
                assert!(ok, "{}: extent of {p} uses '{name}'", k.name);
            }
        }
        for q in k.params.iter().filter(|q| q.ty.starts_with('*')) {
            assert!(
                seen.contains(&q.name),
                "{}: no extent for {}",
                k.name,
                q.name
            );
        }
    }
}
