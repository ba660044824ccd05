//! The `ringgate` binary: flags -> validated configuration -> the server. Nothing else lives here.

use std::process::ExitCode;

use clap::Parser;
use ringgate::config::Config;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(error) = config.validate() {
        eprintln!("ringgate: {error}");
        return ExitCode::from(2);
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
