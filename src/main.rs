//! The `tokenproxy` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    tokenproxy::cli::main()
}
