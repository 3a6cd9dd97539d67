//! The `nlp` binary: parse, set up logging, dispatch, report the error once.

use std::io::IsTerminal;
use std::process::ExitCode;

use nlp::cli::{Cli, Command};

fn main() -> ExitCode {
    set_up_threads();
    let cli = match Cli::parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(err) => return report_usage_error(err),
    };
    init_logging(cli.global.quiet, cli.global.verbose);
    if matches!(
        cli.command,
        Some(Command::Train(_) | Command::Generate(_) | Command::Eval(_) | Command::Lora(_))
    ) {
        keep_freed_memory();
    }
    match on_thread_pool(|| nlp::cmd::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("nlp: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Sets up rayon's global pool before any thread exists. `RAYON_NUM_THREADS`, when
/// unset, becomes the thread count candle would choose (one per physical core):
/// candle asks for its count before every matrix product and, without the variable,
/// recounts the cores by reading `/proc/cpuinfo` each time, dozens of reads per
/// decoded token. The pool's threads get the main thread's 8 MiB of stack, since the
/// whole command runs on one of them ([`on_thread_pool`]).
///
/// `CANDLE_NUM_THREADS`, when unset, becomes 1: candle's own pool for elementwise
/// operations then runs them on the calling thread. Our kernels, on rayon's pool,
/// carry the hot paths; candle's pool would add workers that spin after each of its
/// operations, on the cores rayon's threads are using, and it lets one caller in at a
/// time, so windows scored on several threads at once would queue for it.
fn set_up_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // Fails only if a pool exists already, which then serves as it is.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(8 << 20)
        .build_global();
}

/// Tells glibc's allocator to keep freed memory for the next allocation. A forward
/// pass allocates and frees the same large activations layer after layer; by default
/// those above a (self-raising) threshold are mapped and unmapped each time, or the
/// heap's top is handed back, so every pass faults in and zeroes fresh pages: about a
/// fifth of a 512-token prefill. Peak memory is unchanged: a freed block is reused,
/// not added to. Blocks of 32 MiB and more (glibc's cap for this setting) are still
/// mapped on their own.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets allocator parameters, under the allocator's lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Runs `work` on a thread of rayon's global pool. A parallel loop started there
/// runs on its own thread and the pool's others; started from outside the pool, it
/// would be queued for the pool while the caller sleeps, and every matrix product of
/// a decoding step would pay for waking the caller again.
fn on_thread_pool<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    rayon::scope(|_| work())
}

/// Help and version go to stdout with exit 0; a usage error is one line on stderr.
fn report_usage_error(err: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // Printing help can only fail on a closed stdout, which is not an error.
            let _ = err.print();
            ExitCode::SUCCESS
        }
        _ => {
            let rendered = err.render().to_string();
            let mut lines = rendered.lines().map(str::trim).filter(|l| !l.is_empty());
            let first = lines.next().unwrap_or("invalid arguments");
            let mut message = first.strip_prefix("error: ").unwrap_or(first).to_string();
            // "the following required arguments were not provided:" lists them below.
            if message.ends_with(':') {
                let listed: Vec<&str> = lines.take_while(|l| l.starts_with('-') || l.starts_with('<')).collect();
                message = format!("{} {}", message, listed.join(", "));
            }
            eprintln!("nlp: {message} (see `nlp --help`)");
            ExitCode::from(2)
        }
    }
}

/// Logs go to stderr: progress notes on a terminal, only warnings off one (CI
/// logs, pipes); -q keeps errors only, -v/-vv add debug/trace; RUST_LOG wins.
fn init_logging(quiet: bool, verbose: u8) {
    let terminal = std::io::stderr().is_terminal();
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) if terminal => "info",
        (false, 0) => "warn",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(terminal)
        .with_target(false)
        .without_time()
        .init();
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
