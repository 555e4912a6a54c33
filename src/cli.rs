//! The command line: parse (validate only), then build and run. The one
//! place that maps errors to exit codes: 0 clean, 64 bad usage or config,
//! 1 runtime failure.

use crate::app::App;
use crate::config::{self, Config};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "tokenproxy",
    version,
    about = "A sidecar reverse proxy that injects OAuth access tokens and refreshes them without ever reusing a rotated refresh token.",
    after_help = "Try `tokenproxy demo` for a self-contained playground.\nExit codes: 0 clean, 64 bad usage or config, 1 runtime failure."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy with a config file.
    Run {
        /// The TOML config file.
        #[arg(short, long, env = "TOKENPROXY_CONFIG", value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config file and print a secret-free summary (like `nginx -t`).
    Check {
        #[arg(short, long, env = "TOKENPROXY_CONFIG", value_name = "FILE")]
        config: PathBuf,
    },
    /// Get the first refresh token: authorization code + PKCE in a browser,
    /// stored as a new token family (through the running proxy when it is up).
    Login {
        #[arg(short, long, env = "TOKENPROXY_CONFIG", value_name = "FILE")]
        config: PathBuf,
        /// The credential to log in.
        name: String,
        /// Replace a token family that still works.
        #[arg(long)]
        force: bool,
        /// Try to open the URL in the desktop browser.
        #[arg(long)]
        open: bool,
        /// Do not listen for the callback: paste the redirected URL instead
        /// (for remote machines).
        #[arg(long)]
        no_listen: bool,
        /// The running proxy's admin API (default: from the config).
        #[arg(long, value_name = "URL")]
        admin: Option<String>,
    },
    /// Check config, secrets, store, IdP endpoints, TLS, metadata, clock and
    /// upstreams; never spends a refresh token.
    Doctor {
        #[arg(short, long, env = "TOKENPROXY_CONFIG", value_name = "FILE")]
        config: PathBuf,
        /// Only this credential.
        name: Option<String>,
    },
    /// Print the running proxy's view of every credential (asks the admin API).
    Status {
        #[arg(short, long, env = "TOKENPROXY_CONFIG", value_name = "FILE")]
        config: PathBuf,
    },
    /// Token-store maintenance.
    Store {
        #[command(subcommand)]
        action: StoreAction,
    },
    /// Start a local IdP with strict rotation and 10 s tokens, an echo
    /// upstream and the proxy, and print the curl commands to try.
    Demo {
        /// Where the proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Where the admin API listens.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
        /// Access-token lifetime at the demo IdP.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        token_ttl: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
enum StoreAction {
    /// Move credentials from the store of `--from` to the store of `-c`
    /// (file to postgres or back) without spending a token. Stop the
    /// processes using the old store first; its records are marked
    /// `migrated` (dead) so none of them can present the token again.
    Migrate {
        /// The config whose store holds the tokens now.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The config whose store receives them.
        #[arg(short, long, env = "TOKENPROXY_CONFIG", value_name = "FILE")]
        config: PathBuf,
        /// Only these credentials (default: every refresh_token credential).
        names: Vec<String>,
        /// Replace a working token family in the target store.
        #[arg(long)]
        force: bool,
    },
}

pub const EXIT_USAGE: u8 = 64;

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_USAGE),
            };
        }
    };
    match cli.command {
        Command::Check { config } => match config::load(&config) {
            Ok(c) => {
                print!("{}", c.summary());
                println!("{}: configuration OK", config.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!(
                    "{}: {} error(s); configuration rejected",
                    config.display(),
                    errors.0.len()
                );
                ExitCode::from(EXIT_USAGE)
            }
        },
        Command::Run { config } => {
            let cfg = match load_or_report(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            crate::telemetry::init(cfg.log.format, &cfg.log.level);
            run_blocking(cfg.server.worker_threads, run(cfg))
        }
        Command::Login {
            config,
            name,
            force,
            open,
            no_listen,
            admin,
        } => {
            let cfg = match load_or_report(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            crate::telemetry::init(cfg.log.format, &cfg.log.level);
            let args = crate::login::CliArgs {
                name,
                force,
                open,
                no_listen,
                admin,
            };
            run_blocking(1, async move {
                ExitCode::from(crate::login::run_cli(&cfg, args).await)
            })
        }
        Command::Doctor { config, name } => run_blocking(1, async move {
            ExitCode::from(crate::doctor::run(&config, name.as_deref()).await)
        }),
        Command::Status { config } => {
            let cfg = match load_or_report(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            run_blocking(1, async move {
                match crate::admin::print_status(&cfg).await {
                    Ok(table) => {
                        print!("{table}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("tokenproxy status: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::Demo {
            listen,
            admin,
            token_ttl,
        } => run_blocking(2, crate::demo::run(listen, admin, token_ttl)),
        Command::Store {
            action:
                StoreAction::Migrate {
                    from,
                    config,
                    names,
                    force,
                },
        } => {
            let (src, dst) = match (config::load(&from), config::load(&config)) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            run_blocking(1, store_migrate(src, dst, names, force))
        }
    }
}

async fn store_migrate(src: Config, dst: Config, names: Vec<String>, force: bool) -> ExitCode {
    use crate::token::store::{self, Migrated, Store};
    let names: Vec<String> = if names.is_empty() {
        dst.credentials
            .values()
            .filter(|c| c.grant == config::GrantType::RefreshToken)
            .map(|c| c.name.clone())
            .collect()
    } else {
        names
    };
    let open = |c: Config| async move {
        Store::open_config(&c.store)
            .await
            .map_err(|e| crate::error_chain(&e))
    };
    let (from, to) = match (open(src).await, open(dst).await) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("tokenproxy store migrate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for name in names {
        match store::migrate(&from, &to, &name, force).await {
            Ok(Migrated::Copied { family, generation }) => {
                println!("{name}: moved family {family} generation {generation}");
            }
            Ok(Migrated::NothingStored) => println!("{name}: nothing stored, skipped"),
            Err(e) => {
                eprintln!("tokenproxy store migrate: {}", crate::error_chain(&e));
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The config, or its errors printed and the usage exit code.
fn load_or_report(path: &std::path::Path) -> Result<Config, ExitCode> {
    config::load(path).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(EXIT_USAGE)
    })
}

fn run_blocking(
    worker_threads: usize,
    fut: impl std::future::Future<Output = ExitCode>,
) -> ExitCode {
    // One worker: a current-thread runtime does the same work without the
    // work-stealing scheduler's cross-thread bookkeeping on every wake-up.
    let runtime = if worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads)
            .enable_all()
            .build()
    };
    match runtime {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("tokenproxy: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs until SIGINT or SIGTERM, then drains.
pub async fn run(cfg: Config) -> ExitCode {
    let app = match App::start(&cfg).await {
        Ok(app) => app,
        Err(e) => {
            let chain = crate::token::grant::error_chain(&e);
            tracing::error!(error = %chain, "Start-up failed");
            eprintln!("tokenproxy: {chain}");
            return ExitCode::FAILURE;
        }
    };
    loop {
        match wait_for_signal().await {
            Signal::Stop => break,
            Signal::Reload => {
                // Errors are logged by reload; the old config keeps serving.
                let _ = app.reload().await;
            }
        }
    }
    tracing::info!(grace = ?cfg.server.shutdown_grace, "Shutting down");
    app.shutdown().await;
    ExitCode::SUCCESS
}

pub enum Signal {
    /// SIGINT or SIGTERM.
    Stop,
    /// SIGHUP.
    Reload,
}

pub async fn wait_for_signal() -> Signal {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return Signal::Stop;
    };
    tokio::select! {
        _ = term.recv() => Signal::Stop,
        _ = int.recv() => Signal::Stop,
        _ = hup.recv() => {
            tracing::info!("SIGHUP received: reloading");
            Signal::Reload
        }
    }
}
