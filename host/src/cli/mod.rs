//! The command-line interface: one file per subcommand.
use clap::{Parser, Subcommand};

pub mod assign;
pub mod attention;
pub mod bench;
pub mod eval;
pub mod export;
pub mod import;
pub mod math;
pub mod recipe;
pub mod report;
pub mod train;
pub mod verify;

#[derive(Parser, Debug)]
#[command(
    name = "dinovmf",
    version,
    about = "DINO-vMF self-supervised pre-training of Vision Transformers",
    long_about = "DINO-vMF self-supervised pre-training of Vision Transformers.\n\n\
        Start with `dinovmf train`: it trains the small32 preset with DINO-vMF on a dataset built \
        into the binary and ends with a k-NN evaluation next to the untrained network's."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Pre-train a ViT (DINO or DINO-vMF); ends with a k-NN evaluation.
    Train(Box<train::TrainArgs>),
    /// Evaluate a checkpoint.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Print log C_p, A_p and vMF / DINO logits for given inputs.
    Math(math::MathArgs),
    /// Check every GPU kernel against the reference math (and, with --compare-cpu, training
    /// steps against the CPU backend); needs a build with `--features cuda`.
    VerifyKernels(verify::VerifyArgs),
    /// Export a checkpoint's teacher as an int8 / f16 model file for edge devices, or as
    /// PyTorch state dicts (`--format timm`).
    Export(export::ExportArgs),
    /// Turn a timm / DINO / iBOT state dict (safetensors) into a checkpoint to evaluate,
    /// export or fine-tune.
    Import(Box<import::ImportArgs>),
    /// Assign images to prototypes with an exported model (the on-device code path).
    Assign(assign::AssignArgs),
    /// Draw the last block's [CLS] attention per head over an image (PNG).
    Attention(attention::AttentionArgs),
    /// Write RUN_DIR/report.md with the run's figures and final numbers.
    Report(report::ReportArgs),
    /// Benchmarks: `bench quality` trains with the defaults on a suite of data sets.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Runs one parsed command.
pub fn run(command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Train(a) => train::run(a),
        Command::Eval(c) => eval::run(c),
        Command::Math(a) => math::run(a),
        Command::VerifyKernels(a) => verify::run(a),
        Command::Export(a) => export::run(a),
        Command::Import(a) => import::run(a),
        Command::Assign(a) => assign::run(a),
        Command::Attention(a) => attention::run(a),
        Command::Report(a) => report::run(a),
        Command::Bench(c) => bench::run(c),
    }
}

/// Parses `args` (the program name first) and runs the command: `main` for tests.
pub fn run_args<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    run(&Cli::try_parse_from(args)?.command)
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    match run(&cli.command) {
        Ok(()) => 0,
        Err(e) if e.downcast_ref::<crate::train::Interrupted>().is_some() => {
            eprintln!("{e:#}");
            130
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}
