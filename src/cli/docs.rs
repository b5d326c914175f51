//! `hearth completions` and `hearth man`: the shell completions and man pages
//! the Debian package ships (`scripts/deb.sh` runs both). They are generated
//! from the clap definition of [`Cli`], so they always match this binary's
//! options. The output holds no date, so the same binary makes the same files.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

/// The command as the man pages describe it: without clap's `help`
/// subcommand, which `clap_mangen::generate_to` leaves out as well.
fn command() -> clap::Command {
    Cli::command().disable_help_subcommand(true)
}

/// Writes the completion script for `shell` to stdout.
pub fn completions(shell: Shell) -> anyhow::Result<()> {
    // clap_complete panics on a failed write (e.g. a closed pipe): render
    // into memory, then write with an error.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "hearth", &mut script);
    write_stdout(&script)
}

/// Writes the roff page `hearth.1` to stdout.
pub fn man_page() -> anyhow::Result<()> {
    let mut page = Vec::new();
    man(command())
        .render(&mut page)
        .context("cannot render the man page")?;
    write_stdout(&page)
}

/// Writes `hearth.1` and one page per subcommand (`hearth-run.1`,
/// `hearth-readings-list.1`, …) into `dir`, creating it if needed. This is
/// `clap_mangen::generate_to`, except that every page names the version
/// (clap knows it only for the top command).
pub fn man_pages(dir: &Path) -> anyhow::Result<()> {
    fn write(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub.clone(), dir)?;
        }
        man(cmd).generate_to(dir).map(drop)
    }
    let mut cmd = command();
    // Gives each subcommand its page name (`hearth-run`).
    cmd.build();
    std::fs::create_dir_all(dir)
        .and_then(|()| write(cmd, dir))
        .with_context(|| format!("cannot write man pages into `{}`", dir.display()))
}

fn man(cmd: clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(cmd).source(concat!("hearth ", env!("CARGO_PKG_VERSION")))
}

/// A reader that stops early (`hearth man | head`) is not an error.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result.context("cannot write to stdout"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_cover_every_subcommand_but_help() {
        let dir = tempfile::tempdir().unwrap();
        man_pages(dir.path()).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        for page in [
            "hearth.1",
            "hearth-run.1",
            "hearth-config-check.1",
            "hearth-readings-list.1",
            "hearth-completions.1",
            "hearth-man.1",
        ] {
            assert!(names.iter().any(|n| n == page), "{page} missing: {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("help")), "{names:?}");
        let run = std::fs::read_to_string(dir.path().join("hearth-run.1")).unwrap();
        let version = concat!("\"hearth ", env!("CARGO_PKG_VERSION"), "\"");
        assert!(run.contains(version), "{run}");
    }

    #[test]
    fn top_page_on_stdout_is_the_one_written_to_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        man_pages(dir.path()).unwrap();
        let mut page = Vec::new();
        man(command()).render(&mut page).unwrap();
        assert_eq!(page, std::fs::read(dir.path().join("hearth.1")).unwrap());
    }
}
