//! What every rendering of an accepted spec must be, checked by the `render` and `spec`
//! fuzz targets and by `crates/manager/tests/render_corpus.rs` (which includes this file):
//! every line a comment, a section or `Key=value` with a key of the templates; no value with a
//! control character or a line continuation; as many lines per key as the spec implies; and
//! each value, read back the way systemd reads it (a model of `extract_first_word()` with
//! `EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE`, specifiers, and `$` in `ExecStart=`), equal to what
//! the spec says.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use sdcluster::spec::Spec;
use sdcluster::units::{UnitFile, listen_stream, try_render};

const TEMPLATES: [&str; 5] = [
    include_str!("../../systemd/app.socket"),
    include_str!("../../systemd/app.service"),
    include_str!("../../systemd/app@.service"),
    include_str!("../../systemd/app-reuseport@.socket"),
    include_str!("../../systemd/app.target"),
];

/// The keys the templates set: nothing else may appear in a rendered unit.
pub fn template_keys() -> BTreeSet<String> {
    TEMPLATES
        .iter()
        .flat_map(|t| t.lines())
        .filter(|l| !l.starts_with(['#', ';', '[']) && !l.starts_with("{{"))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_owned()))
        .collect()
}

/// Renders `spec` and checks every property; `Err` says which one failed, and where.
pub fn check_spec(spec: &Spec, systemd: u32) -> Result<Vec<UnitFile>, String> {
    let units = try_render(spec, systemd, Path::new("/etc/sdcluster/fuzz.toml"), Path::new("/usr/bin/sdcluster"))
        .map_err(|e| format!("an accepted spec was not rendered: {e}"))?;
    check_units(spec, &units)?;
    Ok(units)
}

/// The properties of `units`, rendered from `spec`.
pub fn check_units(spec: &Spec, units: &[UnitFile]) -> Result<(), String> {
    let keys = template_keys();
    let mut lines: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for unit in units {
        for (n, line) in unit.content.lines().enumerate() {
            let at = || format!("{} line {}: {line:?}", unit.name, n + 1);
            if line.chars().any(char::is_control) {
                return Err(format!("a control character in {}", at()));
            }
            if line.ends_with('\\') {
                return Err(format!("a line continuation in {}", at()));
            }
            if line.is_empty() || line.starts_with(['#', ';']) {
                continue;
            }
            if line.starts_with('[') {
                if !["[Unit]", "[Service]", "[Socket]", "[Install]"].contains(&line) {
                    return Err(format!("an unknown section in {}", at()));
                }
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!("neither comment, section nor Key=value: {}", at()));
            };
            if !keys.contains(key) {
                return Err(format!("a key of no template: {}", at()));
            }
            // MemoryMax= takes no specifiers: its `50%` is a percentage (systemd-analyze
            // verify refuses `50%%`).
            if key != "MemoryMax" {
                check_specifiers(value).map_err(|e| format!("{e} in {}", at()))?;
            }
            lines.entry((unit.name.as_str(), key)).or_default().push(value);
        }
    }
    let get = |unit: &str, key: &str| lines.get(&(unit, key)).cloned().unwrap_or_default();
    let name = &spec.name;
    let worker = format!("{name}@.service");
    let socket = if units.iter().any(|u| u.name == format!("{name}.socket")) {
        format!("{name}.socket")
    } else {
        format!("{name}@.socket")
    };
    let count = |unit: &str, key: &str, want: usize| {
        let got = get(unit, key).len();
        if got == want { Ok(()) } else { Err(format!("{got} {key}= lines in {unit}, the spec implies {want}")) }
    };
    count(&worker, "ExecStart", 1)?;
    count(&worker, "WatchdogSec", usize::from(spec.watchdog.is_some()))?;
    count(&worker, "MemoryMax", usize::from(spec.memory_max.is_some()))?;
    count(&worker, "WorkingDirectory", usize::from(spec.working_directory.is_some()))?;
    count(&worker, "EnvironmentFile", usize::from(spec.environment_file.is_some()))?;
    count(&worker, "StateDirectory", usize::from(spec.state_directory.is_some()))?;
    count(&worker, "ReadWritePaths", spec.read_write_paths.len())?;
    count(&worker, "LoadCredential", spec.credentials.len())?;
    count(&worker, "User", 1)?;
    count(&socket, "ListenStream", spec.listen.len())?;

    // Read back as systemd reads them.
    let listen: Vec<String> =
        get(&socket, "ListenStream").iter().map(|v| specifiers(v, false)).collect::<Result<_, _>>()?;
    let wanted: Vec<String> = spec.listen.iter().map(listen_stream).collect();
    if listen != wanted {
        return Err(format!("ListenStream= reads back as {listen:?}, the spec says {wanted:?}"));
    }
    let exec = get(&worker, "ExecStart")[0];
    if exec.starts_with(['@', '-', ':', '+', '!', '|']) {
        return Err(format!("ExecStart={exec} starts with a prefix character"));
    }
    let mut argv = Vec::new();
    for (i, word) in words(exec)?.into_iter().enumerate() {
        if word == Word::Separator {
            return Err(format!("ExecStart={exec} has a ';' of its own: a second command"));
        }
        let word = specifiers(&word.text(), false)?;
        argv.push(if i == 0 { word } else { dollars(&word)? });
    }
    if argv != spec.command {
        return Err(format!("ExecStart={exec} reads back as {argv:?}, the spec says {:?}", spec.command));
    }
    let mut environment = Vec::new();
    for value in get(&worker, "Environment") {
        let words = words(value)?;
        if words.len() != 1 {
            return Err(format!("Environment={value} holds {} assignments, not one", words.len()));
        }
        environment.push(specifiers(&words[0].text(), true)?);
    }
    for (key, value) in &spec.environment {
        let assignment = format!("{key}={value}");
        if !environment.contains(&assignment) {
            return Err(format!("{assignment:?} is not among the Environment= lines, read back: {environment:?}"));
        }
    }
    if let Some(e) = environment.iter().find(|a| {
        let key = a.split_once('=').map_or(a.as_str(), |(k, _)| k);
        !key.starts_with("SDCLUSTER_") && !spec.environment.contains_key(key)
    }) {
        return Err(format!("Environment= sets {e:?}, which the spec does not"));
    }
    let paths = |key: &str, want: Vec<String>| -> Result<(), String> {
        let got: Vec<String> = get(&worker, key).iter().map(|v| specifiers(v, false)).collect::<Result<_, _>>()?;
        if got == want { Ok(()) } else { Err(format!("{key}= reads back as {got:?}, the spec says {want:?}")) }
    };
    let shown = |p: &Path| p.display().to_string();
    paths("ReadWritePaths", spec.read_write_paths.iter().map(|p| shown(p)).collect())?;
    paths("WorkingDirectory", spec.working_directory.iter().map(|p| shown(p)).collect())?;
    paths("EnvironmentFile", spec.environment_file.iter().map(|p| shown(p)).collect())?;
    paths("LoadCredential", spec.credentials.iter().map(|(n, p)| format!("{n}:{}", shown(p))).collect())?;
    Ok(())
}

/// Every `%` starts `%%` or one of the specifiers the templates use on purpose.
fn check_specifiers(value: &str) -> Result<(), String> {
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '%' && !matches!(chars.next(), Some('%' | 'i' | 'n')) {
            return Err("a specifier systemd would expand".to_owned());
        }
    }
    Ok(())
}

/// Specifier expansion of a value that came from the spec: `%%` is `%`; with `instance`,
/// `%i` (the templates' own, in `SDCLUSTER_*` values) stands for itself.
fn specifiers(value: &str, instance: bool) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some(s @ ('i' | 'n')) if instance => out.extend(['%', s]),
            other => return Err(format!("{value:?} has the specifier %{}", other.unwrap_or(' '))),
        }
    }
    Ok(out)
}

/// `$` in an `ExecStart=` argument after unquoting: `$$` is `$`; anything else would expand.
fn dollars(word: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = word.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.next() != Some('$') {
            return Err(format!("the argument {word:?} has a $ systemd would expand"));
        }
        out.push(c);
    }
    Ok(out)
}

/// One word of a unit value.
#[derive(Debug, PartialEq, Eq)]
pub enum Word {
    /// Unquoted and unescaped.
    Text(String),
    /// A `;` standing alone, unquoted: `ExecStart=`'s command separator.
    Separator,
}

impl Word {
    fn text(&self) -> String {
        match self {
            Word::Text(t) => t.clone(),
            Word::Separator => ";".into(),
        }
    }
}

/// Splits a value into words as systemd's `extract_first_word()` does with
/// `EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE`: whitespace separates words, `'...'` and `"..."`
/// quote (anywhere in a word), and a backslash escapes, inside quotes too. Only the escapes
/// the renderer writes (`\\`, `\"`, `\'`) are accepted: another one means the renderer wrote
/// something it did not mean.
pub fn words(value: &str) -> Result<Vec<Word>, String> {
    let mut out = Vec::new();
    let mut chars = value.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| " \t\n\r".contains(*c)) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut word = String::new();
        let mut quote: Option<char> = None;
        let mut quoted = false;
        while let Some(c) = chars.next() {
            match (c, quote) {
                ('\\', _) => match chars.next() {
                    Some(e @ ('\\' | '"' | '\'')) => word.push(e),
                    other => return Err(format!("{value:?} has the escape \\{}", other.unwrap_or(' '))),
                },
                (q, Some(open)) if q == open => quote = None,
                (c, Some(_)) => word.push(c),
                ('"' | '\'', None) => {
                    quote = Some(c);
                    quoted = true;
                }
                (c, None) if " \t\n\r".contains(c) => break,
                (c, None) => word.push(c),
            }
        }
        if quote.is_some() {
            return Err(format!("{value:?} has an unterminated quote"));
        }
        out.push(if word == ";" && !quoted { Word::Separator } else { Word::Text(word) });
    }
}
