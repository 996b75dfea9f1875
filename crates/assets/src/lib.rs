//! Man pages and shell completions from a clap command, for packagers: every sdcluster
//! binary offers them the same way, from its own command-line definition, so they can't
//! drift from the real flags.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A man page or one shell's completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asset {
    /// roff for man(1).
    Man,
    /// Completions for this shell.
    Completions(clap_complete::Shell),
}

/// Parses `man`, `bash`, `zsh`, `fish` (or any shell clap_complete knows).
pub fn parse_asset(text: &str) -> Result<Asset, String> {
    if text == "man" {
        return Ok(Asset::Man);
    }
    text.parse().map(Asset::Completions).map_err(|_| format!("{text:?}: expected man, bash, zsh or fish"))
}

impl Asset {
    /// Writes the asset for `command`, installed as `bin`, to stdout.
    pub fn print(self, mut command: clap::Command, bin: &str) -> io::Result<()> {
        let out = &mut io::stdout().lock();
        match self {
            Asset::Man => clap_mangen::Man::new(command).render(out)?,
            Asset::Completions(shell) => clap_complete::generate(shell, &mut command, bin, out),
        }
        out.flush()
    }
}

/// Writes `NAME.1` for `command` and `NAME-VERB.1` for each visible subcommand into `dir`,
/// as git and cargo ship them; returns the files written.
pub fn write_man_pages(command: clap::Command, name: &str, dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let command = command.name(name.to_owned());
    let mut pages = vec![(name.to_owned(), command.clone())];
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let page = format!("{name}-{}", sub.get_name());
        pages.push((page.clone(), sub.clone().name(page)));
    }
    let mut written = Vec::new();
    for (page, command) in pages {
        let path = dir.join(format!("{page}.1"));
        let mut roff = Vec::new();
        clap_mangen::Man::new(command).render(&mut roff)?;
        std::fs::write(&path, roff)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(parse_asset("man"), Ok(Asset::Man));
        assert_eq!(parse_asset("zsh"), Ok(Asset::Completions(clap_complete::Shell::Zsh)));
        assert!(parse_asset("tcsh").unwrap_err().contains("expected man"));
    }

    #[test]
    fn one_page_per_visible_verb() {
        let cli = clap::Command::new("x")
            .about("does x")
            .subcommand(clap::Command::new("go").about("goes"))
            .subcommand(clap::Command::new("secret").hide(true));
        let dir = std::env::temp_dir().join(format!("sdcluster-man-{}", std::process::id()));
        let pages = write_man_pages(cli, "x", &dir).unwrap();
        assert_eq!(pages, [dir.join("x.1"), dir.join("x-go.1")]);
        assert!(std::fs::read_to_string(dir.join("x-go.1")).unwrap().contains("goes"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
