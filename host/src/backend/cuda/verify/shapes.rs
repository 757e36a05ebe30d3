//! The production shapes of the `--large` checks.

/// One production model and batch.
#[derive(Clone, Copy, Debug)]
pub struct LargeShape {
    pub name: &'static str,
    /// Embedding width and heads.
    pub dim: usize,
    pub heads: usize,
    pub batch: usize,
    /// Tokens of a global crop (`(224/16)^2 + 1`) and a local one (`(96/16)^2 + 1`).
    pub global_tokens: usize,
    pub local_tokens: usize,
    pub n_local: usize,
    /// Prototypes and the head's bottleneck width.
    pub k: usize,
    pub bottleneck: usize,
    /// Masked patch rows of the iBOT student (about 30 % of the global crops' patches).
    pub masked_rows: usize,
    /// Whether the head's loss kernels and backward GEMMs run at this shape: they depend only
    /// on the batch, the crops, K and the bottleneck, which ViT-B/16 shares with ViT-S/16.
    pub head: bool,
}

pub const VIT_S16: LargeShape = LargeShape {
    name: "ViT-S/16",
    dim: 384,
    heads: 6,
    batch: 64,
    global_tokens: 197,
    local_tokens: 37,
    n_local: 8,
    k: 65536,
    bottleneck: 256,
    masked_rows: 7526,
    head: true,
};

pub const VIT_B16: LargeShape = LargeShape {
    name: "ViT-B/16",
    dim: 768,
    heads: 12,
    head: false,
    ..VIT_S16
};

impl LargeShape {
    /// Tokens of the two global crops of the batch (the backbone's rows at 224 px).
    pub fn tokens(&self) -> usize {
        self.batch * 2 * self.global_tokens
    }
    /// Tokens of the local crops of the batch.
    pub fn local_tokens(&self) -> usize {
        self.batch * self.n_local * self.local_tokens
    }
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }
    /// Student rows of the head (every crop of every image).
    pub fn students(&self) -> usize {
        self.batch * (2 + self.n_local)
    }
    /// Patch rows of the global crops (iBOT's teacher targets).
    pub fn patch_rows(&self) -> usize {
        self.batch * 2 * (self.global_tokens - 1)
    }
    /// Rows of the attention probabilities of the global crops.
    pub fn attention_rows(&self) -> usize {
        self.batch * 2 * self.heads * self.global_tokens
    }
}
