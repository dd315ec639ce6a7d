//! The `mailscope` binary: everything lives in the library; see `cli.rs`.
fn main() -> std::process::ExitCode {
    mailscope::cli::main()
}
