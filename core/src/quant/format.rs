//! The quantized model file: a 128-byte header, then a payload of sections in a fixed order that
//! the header's configuration determines (no table of contents to get out of sync).
//!
//! Header (all little-endian):
//!
//! | bytes   | field                                                                    |
//! |---------|--------------------------------------------------------------------------|
//! | 0..8    | magic `DINOVMFQ`                                                         |
//! | 8..12   | version (u32, [`VERSION`])                                               |
//! | 12..16  | weight dtype (u32: 0 f32, 1 f16, 2 int8)                                 |
//! | 16..68  | 13 u32: img_size, patch, in_chans, dim, depth, heads, mlp_ratio,         |
//! |         | qkv_bias, head_hidden, bottleneck, head_layers, prototypes, logit kind   |
//! | 68..100 | 8 f32: ln_eps, tau (posterior temperature), mean[3], std[3]              |
//! | 100..108| payload length (u32), FNV-1a checksum (u32) of the whole file except the  |
//! |         | checksum field itself: bytes 0..104 then 108.. (header and payload)      |
//! | 108..128| zero                                                                     |
//!
//! Payload sections, in order ([`for_each_section`]): `cls + pos[0]` `[D]`, `pos[1..]` `[N, D]`,
//! the patch linear `[D, C P P]`, per block `norm1.{w,b}`, `qkv`, `proj`, `norm2.{w,b}`, `fc1`,
//! `fc2`; the final `norm.{w,b}`; the head MLP linears; the prototype layer as a linear
//! `[K, p]` whose per-row scale carries `r_k / tau` and whose bias is the vMF normaliser
//! `D_p(kappa_k)` (0 for DINO logits), so that `logit_k = scale_k (mu_k . y) + bias_k`.
//!
//! A linear section is `act_scale` (f32; 0 = quantize each input row by its own max, else the
//! calibrated scale), `w_scale[out]` (f32), `bias[out]` (f32), then the weights `[out, in]` row
//! major in the file's dtype, zero-padded to a multiple of 4 bytes. Every section length is a
//! multiple of 4 and the payload starts at byte 128, so every f32 sits at a 4-byte aligned file
//! offset; the parser checks this. The values are read with `from_le_bytes`, so the buffer itself
//! may sit at any address (`include_bytes!` promises no alignment).
use core::fmt;

use crate::model::{HeadConfig, IbotParts, ModelConfig, VitConfig};

pub const MAGIC: [u8; 8] = *b"DINOVMFQ";
/// Bump whenever the layout changes; the parser refuses other versions. Version 2: the checksum
/// covers the header too (in version 1, header fields such as `tau` or `mean` lay outside it).
pub const VERSION: u32 = 2;
pub const HEADER_LEN: usize = 128;
/// Upper bound on every size field: keeps all offset arithmetic far from overflow on 32-bit
/// targets and rejects garbage headers early.
const MAX_DIM: u32 = 1 << 16;
/// The head MLP may have at most this many linears (DINO uses 3).
pub const MAX_HEAD_LAYERS: usize = 8;

/// Storage type of the linear weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    /// Per-output-channel symmetric int8.
    I8,
}

impl Dtype {
    pub const fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 => 2,
            Dtype::I8 => 1,
        }
    }
    const fn code(self) -> u32 {
        match self {
            Dtype::F32 => 0,
            Dtype::F16 => 1,
            Dtype::I8 => 2,
        }
    }
    const fn from_code(c: u32) -> Option<Self> {
        match c {
            0 => Some(Dtype::F32),
            1 => Some(Dtype::F16),
            2 => Some(Dtype::I8),
            _ => None,
        }
    }
}

/// Which logits the prototype layer's bias encodes (for display; inference is the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    Dino,
    Vmf,
}

/// Everything the header says.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Header {
    pub dtype: Dtype,
    pub model: ModelConfig,
    pub logits: Logits,
    /// Temperature of the posterior (folded into the prototype scales at export; kept for
    /// display).
    pub tau: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub payload_len: usize,
    pub checksum: u32,
}

/// Why a buffer is not a usable model file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatError {
    /// Shorter than the header.
    TooShort {
        len: usize,
    },
    BadMagic,
    UnsupportedVersion {
        found: u32,
    },
    BadDtype {
        found: u32,
    },
    /// A header field is out of range or the numbers describe no runnable model.
    BadConfig(&'static str),
    /// The header's payload length disagrees with what its configuration needs.
    PayloadLength {
        header: usize,
        expected: usize,
    },
    /// The buffer ends before the payload does.
    Truncated {
        expected: usize,
        got: usize,
    },
    /// Bytes after the payload (most likely a different or corrupted file).
    TrailingBytes {
        expected: usize,
        got: usize,
    },
    /// A section would not start at a 4-byte aligned offset (a writer bug, or a corrupt file).
    Misaligned {
        offset: usize,
    },
    Checksum {
        stored: u32,
        computed: u32,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FormatError::TooShort { len } => write!(
                f,
                "{len} bytes is shorter than the {HEADER_LEN}-byte header of a dinovmf model file"
            ),
            FormatError::BadMagic => write!(
                f,
                "not a dinovmf quantized model (the file does not start with DINOVMFQ)"
            ),
            FormatError::UnsupportedVersion { found } => write!(
                f,
                "model file version {found}, this build reads version {VERSION}: re-export it"
            ),
            FormatError::BadDtype { found } => write!(f, "unknown weight type code {found}"),
            FormatError::BadConfig(what) => write!(f, "invalid model header: {what}"),
            FormatError::PayloadLength { header, expected } => write!(
                f,
                "header says the payload is {header} bytes but its model needs {expected}"
            ),
            FormatError::Truncated { expected, got } => write!(
                f,
                "truncated model file: {got} bytes, the header describes {expected}"
            ),
            FormatError::TrailingBytes { expected, got } => write!(
                f,
                "model file has {got} bytes but the header describes {expected}"
            ),
            FormatError::Misaligned { offset } => {
                write!(f, "section at byte {offset} is not 4-byte aligned")
            }
            FormatError::Checksum { stored, computed } => write!(
                f,
                "corrupt model file: checksum {computed:08x}, header says {stored:08x}"
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for FormatError {}

/// One payload section, as [`for_each_section`] walks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// `len` f32 values.
    F32 { len: usize },
    /// A linear layer `[out, inp]` (see the module docs for its byte layout).
    Linear { out: usize, inp: usize },
}

const fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

impl Section {
    pub const fn bytes(self, dtype: Dtype) -> usize {
        match self {
            Section::F32 { len } => 4 * len,
            Section::Linear { out, inp } => 4 + 8 * out + pad4(out * inp * dtype.bytes()),
        }
    }
}

/// Calls `f` for every section of the payload, in file order.
pub fn for_each_section(m: &ModelConfig, mut f: impl FnMut(Section)) {
    let v = &m.vit;
    let d = v.dim;
    let lin = |out, inp| Section::Linear { out, inp };
    f(Section::F32 { len: d });
    f(Section::F32 {
        len: v.grid() * v.grid() * d,
    });
    f(lin(d, v.patch_len()));
    for _ in 0..v.depth {
        f(Section::F32 { len: d });
        f(Section::F32 { len: d });
        f(lin(3 * d, d));
        f(lin(d, d));
        f(Section::F32 { len: d });
        f(Section::F32 { len: d });
        f(lin(v.mlp_hidden(), d));
        f(lin(d, v.mlp_hidden()));
    }
    f(Section::F32 { len: d });
    f(Section::F32 { len: d });
    for l in 0..m.head.n_layers {
        let (di, dout) = m.head.layer_dims(d, l);
        f(lin(dout, di));
    }
    f(lin(m.head.out_dim, m.head.bottleneck));
}

/// Bytes of the payload a configuration needs.
pub fn payload_len(m: &ModelConfig, dtype: Dtype) -> usize {
    let mut n = 0;
    for_each_section(m, |s| n += s.bytes(dtype));
    n
}

/// FNV-1a (32 bit): cheap enough for a microcontroller, catches flipped and shifted bytes.
pub fn checksum(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Byte offset of the checksum field in the header.
const CHECKSUM_AT: usize = 104;

/// The file checksum: FNV-1a over every byte except the 4 of the checksum field.
pub fn file_checksum(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let head = &bytes[..CHECKSUM_AT.min(bytes.len())];
    let tail = bytes.get(CHECKSUM_AT + 4..).unwrap_or(&[]);
    for &b in head.iter().chain(tail) {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_bits(u32_at(b, i))
}

impl Header {
    /// Reads and validates the header (not the payload).
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        if bytes.len() < HEADER_LEN {
            return Err(FormatError::TooShort { len: bytes.len() });
        }
        if bytes[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = u32_at(bytes, 8);
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion { found: version });
        }
        let code = u32_at(bytes, 12);
        let dtype = Dtype::from_code(code).ok_or(FormatError::BadDtype { found: code })?;
        let mut u = [0usize; 13];
        for (k, x) in u.iter_mut().enumerate() {
            let v = u32_at(bytes, 16 + 4 * k);
            if v > MAX_DIM {
                return Err(FormatError::BadConfig("a size field exceeds 65536"));
            }
            *x = v as usize;
        }
        let [img_size, patch, in_chans, dim, depth, heads, mlp_ratio, qkv_bias, hidden, bottleneck, n_layers, out_dim, kind] =
            u;
        if qkv_bias > 1 {
            return Err(FormatError::BadConfig("qkv_bias must be 0 or 1"));
        }
        let logits = match kind {
            0 => Logits::Dino,
            1 => Logits::Vmf,
            _ => return Err(FormatError::BadConfig("unknown logit kind")),
        };
        if n_layers > MAX_HEAD_LAYERS {
            return Err(FormatError::BadConfig("more than 8 head layers"));
        }
        if in_chans != 3 {
            return Err(FormatError::BadConfig(
                "only RGB (3-channel) models are supported",
            ));
        }
        // Every tensor below 2^28 elements and the payload below 2 GiB, computed in u64 before
        // any usize product (usize is 32 bits on a microcontroller): a garbage header is an
        // error, never an overflow.
        if patch == 0 || heads == 0 {
            return Err(FormatError::BadConfig("patch and heads must be positive"));
        }
        let w = |x: usize| x as u64;
        let (grid, mh) = (w(img_size / patch), w(dim) * w(mlp_ratio));
        let tensors = [
            grid * grid * w(dim),
            w(in_chans) * w(patch) * w(patch) * w(dim),
            3 * w(dim) * w(dim),
            mh * w(dim),
            w(hidden).max(w(bottleneck)) * w(hidden).max(w(dim)),
            w(out_dim) * w(bottleneck),
        ];
        if tensors.iter().any(|&n| n >= 1 << 28) {
            return Err(FormatError::BadConfig("a tensor has 2^28 elements or more"));
        }
        let per_block = 4 * (3 * w(dim) * w(dim) + w(dim) * w(dim) + 2 * mh * w(dim));
        let total =
            tensors.iter().sum::<u64>() * 4 + w(depth) * per_block + w(n_layers) * 4 * tensors[4];
        if total >= 1 << 31 {
            return Err(FormatError::BadConfig("the model is larger than 2 GiB"));
        }
        let f = |k: usize| f32_at(bytes, 68 + 4 * k);
        let model = ModelConfig {
            vit: VitConfig {
                img_size,
                patch,
                in_chans,
                dim,
                depth,
                heads,
                mlp_ratio,
                qkv_bias: qkv_bias == 1,
                ln_eps: f(0) as f64,
                drop_path: 0.0,
                // The edge format has no stem (`dinovmf export` refuses models with one).
                stem_convs: 0,
            },
            head: HeadConfig {
                hidden,
                bottleneck,
                n_layers,
                out_dim,
                norm_last_layer: false,
            },
            // Inference reads [CLS] only: iBOT's mask token and patch head are not exported.
            ibot: IbotParts::NONE,
        };
        if !model.is_valid() {
            return Err(FormatError::BadConfig(
                "the sizes describe no runnable model",
            ));
        }
        let finite_pos = |x: f32| x.is_finite() && x > 0.0;
        let (tau, mean, std) = (f(1), [f(2), f(3), f(4)], [f(5), f(6), f(7)]);
        if !finite_pos(f(0)) || !finite_pos(tau) || !std.iter().all(|&s| finite_pos(s)) {
            return Err(FormatError::BadConfig(
                "ln_eps, tau and std must be positive and finite",
            ));
        }
        if !mean.iter().all(|m| m.is_finite()) {
            return Err(FormatError::BadConfig("mean must be finite"));
        }
        Ok(Header {
            dtype,
            model,
            logits,
            tau,
            mean,
            std,
            payload_len: u32_at(bytes, 100) as usize,
            checksum: u32_at(bytes, 104),
        })
    }

    /// The 128 header bytes (the writer fills in length and checksum).
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&MAGIC);
        let mut put = |i: usize, v: u32| b[i..i + 4].copy_from_slice(&v.to_le_bytes());
        put(8, VERSION);
        put(12, self.dtype.code());
        let (v, h) = (&self.model.vit, &self.model.head);
        let u = [
            v.img_size,
            v.patch,
            v.in_chans,
            v.dim,
            v.depth,
            v.heads,
            v.mlp_ratio,
            v.qkv_bias as usize,
            h.hidden,
            h.bottleneck,
            h.n_layers,
            h.out_dim,
            match self.logits {
                Logits::Dino => 0,
                Logits::Vmf => 1,
            },
        ];
        for (k, x) in u.iter().enumerate() {
            put(16 + 4 * k, *x as u32);
        }
        let fl = [
            v.ln_eps as f32,
            self.tau,
            self.mean[0],
            self.mean[1],
            self.mean[2],
            self.std[0],
            self.std[1],
            self.std[2],
        ];
        for (k, x) in fl.iter().enumerate() {
            put(68 + 4 * k, x.to_bits());
        }
        put(100, self.payload_len as u32);
        put(104, self.checksum);
        b
    }
}

/// Little-endian f32 values read in place.
#[derive(Clone, Copy, Debug)]
pub struct F32s<'a>(&'a [u8]);

impl<'a> F32s<'a> {
    pub fn len(&self) -> usize {
        self.0.len() / 4
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        f32_at(self.0, 4 * i)
    }
    pub fn iter(&self) -> impl Iterator<Item = f32> + 'a {
        self.0
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
    }
}

/// One linear layer, in place in the file.
#[derive(Clone, Copy, Debug)]
pub struct Linear<'a> {
    pub out: usize,
    pub inp: usize,
    pub dtype: Dtype,
    /// 0: quantize each input row by its own max |x| (int8 only); else the calibrated scale.
    pub act_scale: f32,
    pub w_scale: F32s<'a>,
    pub bias: F32s<'a>,
    /// `[out, inp]` in `dtype` (little-endian).
    pub w: &'a [u8],
}

/// Sections of one transformer block.
#[derive(Clone, Copy, Debug)]
pub struct Block<'a> {
    pub norm1_w: F32s<'a>,
    pub norm1_b: F32s<'a>,
    pub qkv: Linear<'a>,
    pub proj: Linear<'a>,
    pub norm2_w: F32s<'a>,
    pub norm2_b: F32s<'a>,
    pub fc1: Linear<'a>,
    pub fc2: Linear<'a>,
}

/// A parsed model: the header and byte offsets into the caller's buffer (nothing copied).
#[derive(Clone, Copy, Debug)]
pub struct Model<'a> {
    pub header: Header,
    bytes: &'a [u8],
    /// Payload offsets of: cls_pos, pos, patch, first block, norm, first head layer, prototypes.
    cls_pos: usize,
    pos: usize,
    patch: usize,
    blocks: usize,
    block_len: usize,
    norm: usize,
    head: [usize; MAX_HEAD_LAYERS],
    protos: usize,
}

impl<'a> Model<'a> {
    /// Validates `bytes` as a model file: header, payload length, section alignment, checksum.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, FormatError> {
        let header = Header::parse(bytes)?;
        let m = &header.model;
        let dt = header.dtype;
        // Offsets of every section, checking alignment as we go.
        let mut offs = [0usize; 8];
        let mut head = [0usize; MAX_HEAD_LAYERS];
        let mut at = HEADER_LEN;
        let mut idx = 0usize;
        let mut misaligned = None;
        let per_block = 8;
        let n_head_start = 3 + per_block * m.vit.depth + 2;
        for_each_section(m, |s| {
            if !at.is_multiple_of(4) && misaligned.is_none() {
                misaligned = Some(at);
            }
            match idx {
                0 => offs[0] = at,
                1 => offs[1] = at,
                2 => offs[2] = at,
                3 => offs[3] = at,
                _ => {}
            }
            if idx == 3 + per_block * m.vit.depth {
                offs[4] = at;
            }
            if idx >= n_head_start && idx < n_head_start + m.head.n_layers {
                head[idx - n_head_start] = at;
            }
            if idx == n_head_start + m.head.n_layers {
                offs[5] = at;
            }
            at += s.bytes(dt);
            idx += 1;
        });
        if let Some(offset) = misaligned {
            return Err(FormatError::Misaligned { offset });
        }
        let expected = at - HEADER_LEN;
        if header.payload_len != expected {
            return Err(FormatError::PayloadLength {
                header: header.payload_len,
                expected,
            });
        }
        if bytes.len() < at {
            return Err(FormatError::Truncated {
                expected: at,
                got: bytes.len(),
            });
        }
        if bytes.len() > at {
            return Err(FormatError::TrailingBytes {
                expected: at,
                got: bytes.len(),
            });
        }
        let computed = file_checksum(bytes);
        if computed != header.checksum {
            return Err(FormatError::Checksum {
                stored: header.checksum,
                computed,
            });
        }
        let block_len = (offs[4] - offs[3]).checked_div(m.vit.depth).unwrap_or(0);
        Ok(Model {
            header,
            bytes,
            cls_pos: offs[0],
            pos: offs[1],
            patch: offs[2],
            blocks: offs[3],
            block_len,
            norm: offs[4],
            head,
            protos: offs[5],
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.header.model
    }

    /// The whole file.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    fn f32s(&self, at: usize, len: usize) -> F32s<'a> {
        F32s(&self.bytes[at..at + 4 * len])
    }

    fn linear(&self, at: usize, out: usize, inp: usize) -> Linear<'a> {
        let dt = self.header.dtype;
        Linear {
            out,
            inp,
            dtype: dt,
            act_scale: f32_at(self.bytes, at),
            w_scale: self.f32s(at + 4, out),
            bias: self.f32s(at + 4 + 4 * out, out),
            w: &self.bytes[at + 4 + 8 * out..at + 4 + 8 * out + out * inp * dt.bytes()],
        }
    }

    /// `cls_token + pos_embed[0]`, `[D]`.
    pub fn cls_pos(&self) -> F32s<'a> {
        self.f32s(self.cls_pos, self.config().vit.dim)
    }

    /// `pos_embed[1..]`, `[N, D]`.
    pub fn pos(&self) -> F32s<'a> {
        let v = &self.config().vit;
        self.f32s(self.pos, v.grid() * v.grid() * v.dim)
    }

    pub fn patch(&self) -> Linear<'a> {
        let v = &self.config().vit;
        self.linear(self.patch, v.dim, v.patch_len())
    }

    pub fn block(&self, i: usize) -> Block<'a> {
        let v = &self.config().vit;
        let (d, mh, dt) = (v.dim, v.mlp_hidden(), self.header.dtype);
        let mut at = self.blocks + i * self.block_len;
        let mut f = |len: usize| {
            let s = self.f32s(at, len);
            at += 4 * len;
            s
        };
        let norm1_w = f(d);
        let norm1_b = f(d);
        let mut l = |out: usize, inp: usize| {
            let s = self.linear(at, out, inp);
            at += Section::Linear { out, inp }.bytes(dt);
            s
        };
        let qkv = l(3 * d, d);
        let proj = l(d, d);
        let norm2_w = F32s(&self.bytes[at..at + 4 * d]);
        let norm2_b = F32s(&self.bytes[at + 4 * d..at + 8 * d]);
        at += 8 * d;
        let fc1 = self.linear(at, mh, d);
        at += Section::Linear { out: mh, inp: d }.bytes(dt);
        let fc2 = self.linear(at, d, mh);
        Block {
            norm1_w,
            norm1_b,
            qkv,
            proj,
            norm2_w,
            norm2_b,
            fc1,
            fc2,
        }
    }

    /// The final LayerNorm's weight and bias.
    pub fn norm(&self) -> (F32s<'a>, F32s<'a>) {
        let d = self.config().vit.dim;
        (self.f32s(self.norm, d), self.f32s(self.norm + 4 * d, d))
    }

    pub fn head_layer(&self, l: usize) -> Linear<'a> {
        let c = self.config();
        let (di, dout) = c.head.layer_dims(c.vit.dim, l);
        self.linear(self.head[l], dout, di)
    }

    /// The prototype layer `[K, p]`: `logit_k = w_scale_k (q_k . y) + bias_k`.
    pub fn prototypes(&self) -> Linear<'a> {
        let h = &self.config().head;
        self.linear(self.protos, h.out_dim, h.bottleneck)
    }

    /// Every linear layer in file order (patch, per block qkv/proj/fc1/fc2, head, prototypes):
    /// the indices calibration uses.
    pub fn num_linears(&self) -> usize {
        1 + 4 * self.config().vit.depth + self.config().head.n_layers + 1
    }
}

#[cfg(feature = "alloc")]
pub use writer::Writer;

#[cfg(feature = "alloc")]
mod writer {
    use super::*;
    use crate::quant::qlinear::{quantize_weights_row, ACT_QMAX};
    use alloc::vec::Vec;

    /// Builds a model file section by section, checking each against the layout.
    pub struct Writer {
        header: Header,
        buf: Vec<u8>,
        sections: Vec<Section>,
        next: usize,
    }

    impl Writer {
        pub fn new(header: Header) -> Self {
            let mut sections = Vec::new();
            for_each_section(&header.model, |s| sections.push(s));
            let mut buf = Vec::with_capacity(HEADER_LEN + payload_len(&header.model, header.dtype));
            buf.extend_from_slice(&[0u8; HEADER_LEN]);
            Writer {
                header,
                buf,
                sections,
                next: 0,
            }
        }

        fn expect(&mut self, got: Section) {
            let want = self.sections.get(self.next).copied();
            assert_eq!(
                want,
                Some(got),
                "section {} written out of layout order",
                self.next
            );
            self.next += 1;
        }

        fn put_f32(&mut self, x: f32) {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }

        pub fn f32s(&mut self, v: &[f32]) {
            self.expect(Section::F32 { len: v.len() });
            for &x in v {
                self.put_f32(x);
            }
        }

        /// A linear `w [out, inp]`, `bias [out]`. `row_scale` (per output row, e.g. the
        /// prototypes' `r_k / tau`) multiplies the row after quantization, so it is exact in
        /// every dtype. `act_amax` is the calibrated max |input| (int8 only; `None` = per-row
        /// dynamic scaling at run time).
        pub fn linear(
            &mut self,
            w: &[f32],
            bias: &[f32],
            row_scale: Option<&[f32]>,
            out: usize,
            inp: usize,
            act_amax: Option<f32>,
        ) {
            assert_eq!(w.len(), out * inp, "linear weight shape");
            assert_eq!(bias.len(), out, "linear bias shape");
            self.expect(Section::Linear { out, inp });
            let dt = self.header.dtype;
            let act = match (dt, act_amax) {
                (Dtype::I8, Some(a)) if a > 0.0 && a.is_finite() => a / ACT_QMAX as f32,
                _ => 0.0,
            };
            self.put_f32(act);
            let mut scales = Vec::with_capacity(out);
            let mut q = Vec::with_capacity(inp);
            let mut wbytes = Vec::with_capacity(out * inp * dt.bytes());
            for o in 0..out {
                let row = &w[o * inp..(o + 1) * inp];
                let rs = row_scale.map_or(1.0, |r| r[o]);
                match dt {
                    Dtype::I8 => {
                        q.clear();
                        q.resize(inp, 0i8);
                        let s = quantize_weights_row(&mut q, row);
                        scales.push(s * rs);
                        wbytes.extend(q.iter().map(|&x| x as u8));
                    }
                    Dtype::F16 => {
                        scales.push(rs);
                        for &x in row {
                            wbytes.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
                        }
                    }
                    Dtype::F32 => {
                        scales.push(rs);
                        for &x in row {
                            wbytes.extend_from_slice(&x.to_le_bytes());
                        }
                    }
                }
            }
            for s in scales {
                self.put_f32(s);
            }
            for &b in bias {
                self.put_f32(b);
            }
            self.buf.extend_from_slice(&wbytes);
            while !self.buf.len().is_multiple_of(4) {
                self.buf.push(0);
            }
        }

        /// The finished file (header with length and checksum).
        pub fn finish(mut self) -> Vec<u8> {
            assert_eq!(
                self.next,
                self.sections.len(),
                "model file finished after {} of {} sections",
                self.next,
                self.sections.len()
            );
            self.header.payload_len = self.buf.len() - HEADER_LEN;
            self.header.checksum = 0;
            let h = self.header.to_bytes();
            self.buf[..HEADER_LEN].copy_from_slice(&h);
            self.header.checksum = file_checksum(&self.buf);
            let h = self.header.to_bytes();
            self.buf[..HEADER_LEN].copy_from_slice(&h);
            self.buf
        }
    }
}
