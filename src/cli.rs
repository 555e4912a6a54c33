//! The command line: parse the arguments, load and validate the config,
//! then run the command. Exit codes come from [`crate::process`]: 0 clean,
//! 64 bad usage or config, 1 runtime failure; `login` and `doctor` choose
//! theirs from the same table.

use crate::app::App;
use crate::config::{self, Config};
use crate::process::{wait_for_signal, Signal, EXIT_USAGE};
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
pub(crate) struct Cli {
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
    /// Get the first refresh token: authorization code + PKCE in a browser
    /// (or the device grant with --device), stored as a new token family
    /// (through the running proxy when it is up).
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
        /// Use the device grant (RFC 8628): print a code to enter on any
        /// device with a browser (a phone), then poll until it is approved.
        #[arg(long, conflicts_with = "no_listen")]
        device: bool,
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
    /// Explain tokenproxy's JSON log lines (stdin or -f FILE): per
    /// credential, the failures by cause, what tokenproxy did and the fix.
    /// With REASON (a `reason`, `outcome` or OAuth code), print its entry.
    Explain {
        /// A `reason`, `outcome` or OAuth code from a log line or a 503 body.
        reason: Option<String>,
        /// The log file to read (default: stdin; `-` for stdin).
        #[arg(short, long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// `text` for people, `json` for machines.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        format: String,
    },
    /// List the provider profiles, or show one's effective settings, the
    /// notes a user must know and the vendor pages (docs/providers.md).
    Providers {
        #[command(subcommand)]
        action: Option<ProvidersAction>,
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
enum ProvidersAction {
    /// Print one profile: what `provider = "NAME"` fills, the notes and the
    /// vendor documentation it was taken from.
    Show {
        /// The provider's name, as `tokenproxy providers` lists it.
        name: String,
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
    /// Reseal every stored token set under the current
    /// `store.encryption_key` (after adding a new key and moving the old
    /// one to `store.previous_encryption_keys`). Spends no token.
    Rekey {
        #[arg(short, long, env = "TOKENPROXY_CONFIG", value_name = "FILE")]
        config: PathBuf,
    },
    /// Write credentials' token sets to a new file (0600; sealed with the
    /// store's encryption key when it has one) and mark them moved in the
    /// store, so nothing still using it can present those refresh tokens.
    Export {
        #[arg(short, long, env = "TOKENPROXY_CONFIG", value_name = "FILE")]
        config: PathBuf,
        /// The credentials to export.
        #[arg(long = "credential", value_name = "NAME", required = true, num_args = 1..)]
        credentials: Vec<String>,
        /// The file to create (never overwritten); `-` for stdout.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Leave the token sets live in the store. The file must then never
        /// be imported while anything still uses this store.
        #[arg(long)]
        keep: bool,
    },
    /// Write the token sets of a `store export` file into the store of `-c`.
    Import {
        #[arg(short, long, env = "TOKENPROXY_CONFIG", value_name = "FILE")]
        config: PathBuf,
        /// The export file; `-` for stdin.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        /// Replace a working token family in the store (an older generation
        /// of the same family is refused regardless).
        #[arg(long)]
        force: bool,
    },
}

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
                // Warnings last, where `check` readers look; never an error.
                if let (config::StoreKind::Postgres, Some(url)) = (&c.store.kind, &c.store.url) {
                    if let Some(w) = crate::token::pg::tls_warning(url.expose()) {
                        println!("warning: {w}");
                    }
                }
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
            run_blocking(run(cfg))
        }
        Command::Login {
            config,
            name,
            force,
            open,
            no_listen,
            admin,
            device,
        } => {
            let cfg = match load_or_report(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            crate::telemetry::init(cfg.log.format, &cfg.log.level);
            if device {
                return run_blocking(async move {
                    let code =
                        crate::device::run_cli(&cfg, &name, force, open, admin.as_deref()).await;
                    ExitCode::from(code)
                });
            }
            let args = crate::login::CliArgs {
                name,
                force,
                open,
                no_listen,
                admin,
            };
            run_blocking(async move { ExitCode::from(crate::login::run_cli(&cfg, args).await) })
        }
        Command::Doctor { config, name } => run_blocking(async move {
            ExitCode::from(crate::doctor::run(&config, name.as_deref()).await)
        }),
        Command::Status { config } => {
            let cfg = match load_or_report(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            run_blocking(async move {
                match crate::admin_client::status_table(&cfg).await {
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
        Command::Explain {
            reason,
            file,
            format,
        } => {
            let format = if format == "json" {
                crate::explain::Format::Json
            } else {
                crate::explain::Format::Text
            };
            crate::explain::run(reason.as_deref(), file.as_deref(), format)
        }
        Command::Demo {
            listen,
            admin,
            token_ttl,
        } => run_blocking(crate::demo::run(listen, admin, token_ttl)),
        Command::Providers { action } => match action {
            None => {
                print!("{}", crate::providers::list());
                ExitCode::SUCCESS
            }
            Some(ProvidersAction::Show { name }) => match crate::providers::find(&name) {
                Some(p) => {
                    print!("{}", crate::providers::show(p));
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!(
                        "unknown provider {name:?}; expected one of: {}",
                        crate::providers::names().join(", ")
                    );
                    ExitCode::from(EXIT_USAGE)
                }
            },
        },
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
            run_blocking(store_migrate(src, dst, names, force))
        }
        Command::Store {
            action: StoreAction::Rekey { config },
        } => {
            let cfg = match load_or_report(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if cfg.store.encryption_key.is_none() {
                eprintln!(
                    "tokenproxy store rekey: {}: store.encryption_key is not set; there is no key to seal under",
                    config.display()
                );
                return ExitCode::from(EXIT_USAGE);
            }
            run_blocking(store_rekey(cfg))
        }
        Command::Store {
            action:
                StoreAction::Export {
                    config,
                    credentials,
                    out,
                    keep,
                },
        } => {
            let cfg = match load_or_report(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if out != std::path::Path::new("-") && out.symlink_metadata().is_ok() {
                eprintln!(
                    "tokenproxy store export: {} already exists; refusing to overwrite it",
                    out.display()
                );
                return ExitCode::from(EXIT_USAGE);
            }
            run_blocking(store_export(cfg, credentials, out, keep))
        }
        Command::Store {
            action:
                StoreAction::Import {
                    config,
                    input,
                    force,
                },
        } => {
            let cfg = match load_or_report(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            run_blocking(store_import(cfg, input, force))
        }
    }
}

async fn store_migrate(src: Config, dst: Config, names: Vec<String>, force: bool) -> ExitCode {
    use crate::token::store::Store;
    use crate::token::transfer::{self, Migrated};
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
        match transfer::migrate(&from, &to, &name, force).await {
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

async fn store_rekey(cfg: Config) -> ExitCode {
    const WHO: &str = "tokenproxy store rekey";
    let store = match open_store(&cfg, WHO).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let done = match store.rekey().await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{WHO}: {}", crate::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let kid = &done.key_id;
    for name in &done.resealed {
        println!("{name}: resealed under key id {kid}");
    }
    for name in &done.unchanged {
        println!("{name}: already sealed under key id {kid}");
    }
    for (_, e) in &done.failed {
        eprintln!("{WHO}: {} (left as it is)", crate::error_chain(e));
    }
    if done.failed.is_empty() {
        println!("every stored token set is sealed under key id {kid}; once every process runs with this key, store.previous_encryption_keys can go");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn store_export(cfg: Config, names: Vec<String>, out: PathBuf, keep: bool) -> ExitCode {
    use crate::token::seal::Keyring;
    use crate::token::transfer;
    const WHO: &str = "tokenproxy store export";
    let store = match open_store(&cfg, WHO).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let export = match transfer::begin_export(&store, &names).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("{WHO}: {}", crate::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let keys = Keyring::from_config(&cfg.store);
    let to_stdout = out == std::path::Path::new("-");
    let shown = if to_stdout {
        "stdout".to_owned()
    } else {
        out.display().to_string()
    };
    if keys.is_none() {
        eprintln!("WARNING: the store has no encryption_key, so {shown} holds refresh tokens in clear: keep it secret, import it once, then delete it");
    }
    let written = if to_stdout {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(&export.document(keys.as_ref()))
            .and_then(|()| stdout.flush())
    } else {
        write_new_private(&out, &export.document(keys.as_ref()))
    };
    if let Err(e) = written {
        // Nothing was marked: the store stays as it was.
        eprintln!("{WHO}: cannot write {shown}: {e}");
        export.abandon().await;
        return ExitCode::FAILURE;
    }
    let summary: Vec<String> = export
        .records()
        .iter()
        .map(|(name, r)| {
            format!(
                "{name}: exported family {} generation {}",
                r.family, r.generation
            )
        })
        .collect();
    if let Err((marked, e)) = export.finish(&store, keep).await {
        eprintln!("{WHO}: {}", crate::error_chain(&e));
        if marked.is_empty() && !keep && !to_stdout {
            // Nothing moved: no second live copy may stay behind.
            let _ = std::fs::remove_file(&out);
            eprintln!("{WHO}: nothing was marked moved; {shown} removed");
        } else if marked.is_empty() {
            eprintln!("{WHO}: nothing was marked moved; do not import what was written to {shown} while the store is in use");
        } else {
            eprintln!("{WHO}: marked moved so far: [{}]; the others are still live in the store, so stop everything using it before importing {shown}", marked.join(", "));
        }
        return ExitCode::FAILURE;
    }
    for line in summary {
        eprintln!("{line}");
    }
    if keep {
        eprintln!("WARNING: --keep: the store still uses these token sets; never import {shown} while anything uses this store, or two processes will present the same refresh token and the IdP may revoke the family");
    } else {
        eprintln!("the store marks them moved: processes using it stop refreshing them; import {shown} with `tokenproxy store import`");
    }
    ExitCode::SUCCESS
}

async fn store_import(cfg: Config, input: PathBuf, force: bool) -> ExitCode {
    use crate::token::seal::Keyring;
    use crate::token::transfer;
    const WHO: &str = "tokenproxy store import";
    let bytes = if input == std::path::Path::new("-") {
        use std::io::Read;
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf).map(|_| buf)
    } else {
        std::fs::read(&input)
    };
    let bytes = match bytes {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{WHO}: cannot read {}: {e}", input.display());
            return ExitCode::FAILURE;
        }
    };
    let records = match transfer::read_export(&bytes, Keyring::from_config(&cfg.store).as_ref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{WHO}: {}: {}", input.display(), crate::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let store = match open_store(&cfg, WHO).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    // Marked consumed before anything becomes live: the same file can never
    // make a second live copy elsewhere.
    let from_file = input != std::path::Path::new("-");
    if from_file {
        let marked = transfer::mark_imported(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|m| replace_private(&input, &m).map_err(|e| e.to_string()));
        if let Err(e) = marked {
            eprintln!("{WHO}: cannot mark {} as imported ({e}); refusing to import it, since it could then be imported a second time", input.display());
            return ExitCode::FAILURE;
        }
    } else {
        eprintln!("WARNING: an export read from stdin cannot be marked imported: never import it a second time");
    }
    let mut failed = false;
    let mut imported = 0;
    for (name, rec) in &records {
        if !cfg.credentials.contains_key(name) {
            eprintln!(
                "WARNING: {name} is not a credential in {}; imported all the same",
                cfg.source.display()
            );
        }
        match transfer::import(&store, name, rec, force).await {
            Ok(()) => {
                imported += 1;
                println!(
                    "{name}: imported family {} generation {}",
                    rec.family, rec.generation
                )
            }
            Err(e) => {
                eprintln!("{WHO}: {}", crate::error_chain(&e));
                failed = true;
            }
        }
    }
    if from_file && imported == 0 {
        // Nothing became live: the file may be imported again (with --force).
        if let Err(e) = replace_private(&input, &bytes) {
            eprintln!(
                "{WHO}: nothing was imported, but {} stays marked imported ({e})",
                input.display()
            );
        }
    } else if from_file && failed {
        eprintln!("{WHO}: {} is marked imported; the credentials above that failed stay in it only: import them from a copy with `\"imported_at_ms\"` removed, into this store only", input.display());
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The configured store, or the error printed and exit code 1.
async fn open_store(cfg: &Config, who: &str) -> Result<crate::token::store::Store, ExitCode> {
    crate::token::store::Store::open_config(&cfg.store)
        .await
        .map_err(|e| {
            eprintln!("{who}: {}", crate::error_chain(&e));
            ExitCode::FAILURE
        })
}

/// Replaces `path` durably (temp file and rename), 0600.
fn replace_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".importing");
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    write_new_private(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Creates `path` 0600 (never replacing a file) and writes it durably.
fn write_new_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// The config, or its errors printed and the usage exit code.
fn load_or_report(path: &std::path::Path) -> Result<Config, ExitCode> {
    config::load(path).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(EXIT_USAGE)
    })
}

/// A current-thread runtime: `run` adds its extra proxy workers as threads
/// with runtimes of their own (see `App::start_with_workers`), which costs
/// less per request than a work-stealing scheduler.
fn run_blocking(fut: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match runtime {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("tokenproxy: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs until SIGINT or SIGTERM, then drains.
pub(crate) async fn run(cfg: Config) -> ExitCode {
    let app = match App::start_with_workers(&cfg).await {
        Ok(app) => app,
        Err(e) => {
            let chain = crate::error_chain(&e);
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
    tokio::select! {
        _ = app.shutdown() => ExitCode::SUCCESS,
        // A second signal: exit now, drained or not.
        _ = async { while !matches!(wait_for_signal().await, Signal::Stop) {} } => {
            tracing::warn!(event = "shutdown_forced", "Second signal: exiting without waiting");
            ExitCode::FAILURE
        }
    }
}
