//! The convention: a runbook's Markdown read into steps, each the script of one
//! ```` ```sh ```` block (or hidden `<!-- setup` step) with the outcome its directives promise.

use std::net::SocketAddr;
use std::time::Duration;

/// One block of a runbook.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Step {
    /// The line of its opening fence (or of `<!-- setup`), 1-based, for messages.
    pub(crate) line: usize,
    /// Run, hidden set-up, or shown only.
    pub(crate) kind: Kind,
    /// The shell script: the block's lines, fence indentation removed.
    pub(crate) script: String,
    /// Substrings its output (stdout and stderr) must contain.
    pub(crate) expect: Vec<String>,
    /// Substrings its output must not contain.
    pub(crate) expect_not: Vec<String>,
    /// The exit status it must end with.
    pub(crate) exit: i32,
    /// Run it again until it meets its expectations, for at most this long.
    pub(crate) retry: Option<Duration>,
    /// Client load while it runs.
    pub(crate) load: Option<LoadCheck>,
    /// Print its output as a measured figure, under this label.
    pub(crate) report: Option<String>,
}

/// How a step is treated.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    /// A ```` ```sh ```` block the test runs.
    Run,
    /// An `<!-- setup … -->` comment: run, not shown to readers.
    Setup,
    /// A block starting with `# not run by the tests: WHY`: shown, not run.
    Shown(String),
}

/// Clients requesting `/` from `addr` while a step runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LoadCheck {
    pub(crate) addr: SocketAddr,
    /// Whether a refused or failed request fails the step (`load:`), or is only reported
    /// (`measure:`).
    pub(crate) lossless: bool,
}

/// The first line of a block that the tests do not run.
pub(crate) const NOT_RUN: &str = "# not run by the tests";

/// Info strings that would be shell code the tests never see: use `sh`.
pub(crate) const OTHER_SHELLS: &[&str] = &["bash", "shell", "console", "shell-session", "zsh", "terminal"];

/// A `<!-- key: value -->` line, if `line` is one.
pub(crate) fn directive(line: &str) -> Option<(&str, &str)> {
    let inner = line.trim().strip_prefix("<!--")?.strip_suffix("-->")?.trim();
    let (key, value) = inner.split_once(':')?;
    let is_key = !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '-');
    is_key.then(|| (key, value.trim()))
}

/// `30s`, `500ms`, `2m`.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        _ => None,
    }
}

/// The steps of a runbook, in order; an error names the line that breaks the convention.
pub(crate) fn parse(text: &str) -> Result<Vec<Step>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut steps = Vec::new();
    let mut pending: Vec<(usize, &str, &str)> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim();
        let number = i + 1;
        if let Some((key, value)) = directive(trimmed) {
            pending.push((number, key, value));
            i += 1;
            continue;
        }
        if trimmed == "<!-- setup" {
            let end = (i + 1..lines.len())
                .find(|&j| lines[j].trim() == "-->")
                .ok_or(format!("line {number}: `<!-- setup` is never closed by a line `-->`"))?;
            let script = lines[i + 1..end].join("\n");
            steps.push(step(number, Kind::Setup, script, &pending)?);
            pending.clear();
            i = end + 1;
            continue;
        }
        let ticks = trimmed.len() - trimmed.trim_start_matches('`').len();
        if ticks >= 3 {
            let info = &trimmed[ticks..];
            let indent = line.len() - line.trim_start().len();
            // Closed by a line of at least as many backticks and nothing else (CommonMark).
            let closes = |l: &str| {
                let l = l.trim();
                l.len() >= ticks && l.chars().all(|c| c == '`')
            };
            let end = (i + 1..lines.len())
                .find(|&j| closes(lines[j]))
                .ok_or(format!("line {number}: the ``` block is never closed"))?;
            let body: Vec<&str> = lines[i + 1..end]
                .iter()
                .map(|l| match (l.get(..indent), l.get(indent..)) {
                    (Some(margin), Some(rest)) if margin.trim().is_empty() => rest,
                    _ => l.trim_start(),
                })
                .collect();
            let info = info.split_whitespace().next().unwrap_or("");
            if info == "sh" {
                let kind = match body.first() {
                    Some(first) if first.starts_with(NOT_RUN) => {
                        let why = first[NOT_RUN.len()..].trim_start_matches(':').trim();
                        if why.is_empty() {
                            return Err(format!("line {number}: say why the block is not run: `{NOT_RUN}: WHY`"));
                        }
                        Kind::Shown(why.to_owned())
                    }
                    _ => Kind::Run,
                };
                if matches!(kind, Kind::Shown(_)) && !pending.is_empty() {
                    return Err(format!("line {number}: a block that is not run can't promise an outcome"));
                }
                steps.push(step(number, kind, body.join("\n"), &pending)?);
            } else if OTHER_SHELLS.contains(&info) {
                return Err(format!("line {number}: ```{info} blocks are not run; use ```sh (see README.md)"));
            } else if let Some((at, key, _)) = pending.first() {
                return Err(format!("line {at}: `{key}:` is above a ```{info} block, which is not run"));
            }
            pending.clear();
            i = end + 1;
            continue;
        }
        if let Some((at, key, _)) = pending.first() {
            return Err(format!("line {at}: `{key}:` must be directly above a ```sh block or `<!-- setup`"));
        }
        i += 1;
    }
    if let Some((at, key, _)) = pending.first() {
        return Err(format!("line {at}: `{key}:` is above no block"));
    }
    Ok(steps)
}

/// A step from its script and the directives above it.
pub(crate) fn step(
    line: usize,
    kind: Kind,
    script: String,
    directives: &[(usize, &str, &str)],
) -> Result<Step, String> {
    let mut step =
        Step { line, kind, script, expect: vec![], expect_not: vec![], exit: 0, retry: None, load: None, report: None };
    for &(at, key, value) in directives {
        let bad = |what: &str| format!("line {at}: `{key}: {value}`: {what}");
        match key {
            "expect" => step.expect.push(value.to_owned()),
            "expect-not" => step.expect_not.push(value.to_owned()),
            "exit" => step.exit = value.parse().map_err(|_| bad("not an exit status"))?,
            "retry" => step.retry = Some(parse_duration(value).ok_or_else(|| bad("not a duration like 30s"))?),
            "load" | "measure" => {
                if step.load.is_some() {
                    return Err(bad("one load per block"));
                }
                let addr = value.parse().map_err(|_| bad("not an address like 127.0.0.1:8080"))?;
                step.load = Some(LoadCheck { addr, lossless: key == "load" });
            }
            "report" => step.report = Some(value.to_owned()),
            _ => return Err(bad("unknown directive (expect, expect-not, exit, retry, load, measure, report)")),
        }
        if value.is_empty() {
            return Err(bad("empty value"));
        }
    }
    Ok(step)
}

/// The heading anchors of a Markdown text, as GitHub makes them: lower case, spaces to `-`,
/// punctuation other than `-` and `_` dropped.
pub(crate) fn anchors(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn the_parser_reads_the_convention() {
    let text = "\
Intro.

<!-- expect: active -->
<!-- exit: 3 -->
```sh
systemctl is-active web.socket
```

<!-- setup
install -m 0755 a /usr/local/bin/
-->

1. A step in a list:

   <!-- retry: 30s -->
   <!-- load: 127.0.0.1:8080 -->
   ```sh
   sdcluster restart --rolling web
   ```

```sh
# not run by the tests: needs a second host
ssh web2 true
```

```toml
listen = [\"*:80\"]
```

````markdown
<!-- expect: shown, not run -->
```sh
false
```
````
";
    let steps = parse(text).unwrap();
    assert_eq!(steps.len(), 4);
    assert_eq!((steps[0].line, &steps[0].kind, steps[0].exit), (5, &Kind::Run, 3));
    assert_eq!(steps[0].expect, ["active"]);
    assert_eq!((&steps[1].kind, steps[1].script.as_str()), (&Kind::Setup, "install -m 0755 a /usr/local/bin/"));
    assert_eq!(steps[2].script, "sdcluster restart --rolling web");
    assert_eq!(steps[2].retry, Some(Duration::from_secs(30)));
    assert_eq!(steps[2].load, Some(LoadCheck { addr: "127.0.0.1:8080".parse().unwrap(), lossless: true }));
    assert_eq!(steps[3].kind, Kind::Shown("needs a second host".into()));

    let error = |text: &str| parse(text).unwrap_err();
    assert!(error("<!-- expect: x -->\n\n```sh\ntrue\n```\n").contains("directly above"));
    assert!(error("<!-- expct: x -->\n```sh\ntrue\n```\n").contains("unknown directive"));
    assert!(error("<!-- exit: x -->\n```sh\ntrue\n```\n").contains("not an exit status"));
    assert!(error("```bash\ntrue\n```\n").contains("use ```sh"));
    assert!(error("```sh\n# not run by the tests\ntrue\n```\n").contains("say why"));
    assert!(error("<!-- expect: x -->\n```sh\n# not run by the tests: no\n```\n").contains("can't promise"));
    assert!(error("```sh\ntrue\n").contains("never closed"));
    assert!(error("<!-- setup\ntrue\n").contains("never closed"));
    assert_eq!(anchors("## A port that won't bind\n## 2. Describe it"), ["a-port-that-wont-bind", "2-describe-it"]);
}
