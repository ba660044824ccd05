//! The `ringgate` binary: flags -> validated configuration -> the server. Nothing else lives here.

use std::process::ExitCode;

use ringgate::config::{Config, LoadError};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let config = match Config::load(std::env::args_os()) {
        Ok(config) => config,
        Err(LoadError::Usage(error)) => error.exit(),
        Err(LoadError::Invalid(error)) => {
            eprintln!("ringgate: {error}");
            return ExitCode::from(2);
        }
    };
    if config.check_config {
        use std::io::Write as _;
        // A reader that stops early (`--check-config | head -1`) is not the configuration's fault:
        // a closed stdout is not a reason to panic.
        let _ = writeln!(std::io::stdout(), "configuration OK\n{config:#?}");
        return ExitCode::SUCCESS;
    }
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();

    match ringgate::io::run(&config) {
        Ok(()) => {
            // Workers still draining past --drain-timeout are abandoned, not joined.
            std::process::exit(0);
        }
        Err(error) => {
            eprintln!("ringgate: {error}");
            ExitCode::from(1)
        }
    }
}
