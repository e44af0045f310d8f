//! The `jobmirror` binary: all work is in `jobmirror::cli`.

fn main() -> std::process::ExitCode {
    jobmirror::cli::main()
}
