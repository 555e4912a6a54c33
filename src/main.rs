//! The `tokenproxy` binary: everything lives in the library.

// glibc's malloc costs more per request than the rest of the pipeline's
// header work; mimalloc's thread-local free lists cut it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tokenproxy::cli::main()
}
