fn main() {
    std::process::exit(dinovmf::cli::main());
}
