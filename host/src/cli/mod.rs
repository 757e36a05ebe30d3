//! The command-line interface: one file per subcommand.
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "dinovmf",
    version,
    about = "DINO-vMF self-supervised pre-training of Vision Transformers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Placeholder.
    Version,
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("dinovmf {}", env!("CARGO_PKG_VERSION"));
            0
        }
    }
}
