//! Running a runbook: a box of its own, the binaries under test copied in, then every step
//! in order, each checked against what its directives promise.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sdcluster_tests::deb::package;
use sdcluster_tests::load::MixedLoad;
use sdcluster_tests::sdbox::{self, Boot, SdBox};
use sdcluster_tests::{sdcluster_binary, worker_binary};

use crate::markdown::{Kind, Step, parse};
use crate::{RUNBOOKS, STEP_TIMEOUT_SECS, runbook_path};

/// Boots a box for runbook `name`, prepares it as [`RUNBOOKS`] says, and runs every step.
pub(crate) fn run_runbook(name: &str) {
    let needs = RUNBOOKS.iter().find(|(n, _)| *n == name).map(|(_, needs)| *needs).expect("a runbook of RUNBOOKS");
    let text = std::fs::read_to_string(runbook_path(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let steps = parse(&text).unwrap_or_else(|e| panic!("docs/runbooks/{name}: {e}"));
    let deb = if needs.deb {
        match package() {
            Some(deb) => Some(deb),
            None => return,
        }
    } else {
        None
    };
    let stem = name.trim_end_matches(".md");
    let boot = Boot { private_network: true, ..Boot::default() };
    let Some(sdbox) = SdBox::up_with(&format!("runbook-{stem}-{}", std::process::id()), &boot) else { return };
    let started = Instant::now();
    sdbox.copy_in(sdcluster_binary(), "/root/sdcluster/target/release/sdcluster");
    sdbox.copy_in(worker_binary(), "/root/sdcluster/target/release/sdcluster-worker");
    if let Some(deb) = &deb {
        let file = deb.file_name().and_then(|f| f.to_str()).expect("a .deb file name");
        sdbox.copy_in(deb, &format!("/root/{file}"));
    }
    let mut shown = 0;
    for step in &steps {
        match &step.kind {
            Kind::Shown(why) => {
                shown += 1;
                eprintln!("[{name}:{}] not run: {why}", step.line);
            }
            Kind::Run | Kind::Setup => run_step(&sdbox, name, step),
        }
    }
    let run = steps.len() - shown;
    eprintln!("[{name}] {run} blocks run, {shown} shown only, in {:.1?}", started.elapsed());
}

/// What a step's run did.
pub(crate) struct Outcome {
    output: Output,
    elapsed: Duration,
}

impl Outcome {
    /// stdout, then stderr.
    fn text(&self) -> String {
        format!("{}{}", String::from_utf8_lossy(&self.output.stdout), String::from_utf8_lossy(&self.output.stderr))
    }

    /// Why it is not what `step` promised, if it is not.
    fn mismatch(&self, step: &Step) -> Option<String> {
        let code = self.output.status.code();
        if code == Some(124) && step.exit != 124 {
            return Some(format!("timed out after {STEP_TIMEOUT_SECS}s"));
        }
        if code != Some(step.exit) {
            return Some(format!("exit status {:?}, expected {}", code, step.exit));
        }
        let text = self.text();
        if let Some(missing) = step.expect.iter().find(|e| !text.contains(e.as_str())) {
            return Some(format!("the output lacks {missing:?}"));
        }
        if let Some(present) = step.expect_not.iter().find(|e| text.contains(e.as_str())) {
            return Some(format!("the output has {present:?}"));
        }
        None
    }
}

/// Runs one block in the box (again, while it has `retry:` time left) and checks it.
pub(crate) fn run_step(sdbox: &SdBox, name: &str, step: &Step) {
    let load = step.load.map(|check| {
        let load = in_network_of(sdbox, move || MixedLoad::start(check.addr, 3, 3));
        load.wait_for_more(100);
        load
    });
    let deadline = step.retry.map(|d| Instant::now() + d);
    let script = format!("cd /root\n{}", step.script);
    let timeout = STEP_TIMEOUT_SECS.to_string();
    let outcome = loop {
        let began = Instant::now();
        let output = sdbox.exec(&["timeout", "-k", "5", &timeout, "bash", "-e", "-o", "pipefail", "-c", &script]);
        let outcome = Outcome { output, elapsed: began.elapsed() };
        match outcome.mismatch(step) {
            None => break outcome,
            Some(_) if deadline.is_some_and(|d| Instant::now() < d) => std::thread::sleep(Duration::from_millis(500)),
            Some(why) => panic!(
                "docs/runbooks/{name}:{}: {why}\n--- block\n{}\n--- output\n{}--- journal\n{}",
                step.line,
                step.script,
                outcome.text(),
                String::from_utf8_lossy(&sdbox.exec(&["journalctl", "--no-pager", "-n", "80"]).stdout)
            ),
        }
    };
    let what = if step.kind == Kind::Setup { "setup" } else { "block" };
    eprintln!("[{name}:{}] {what} ok in {:.2?}", step.line, outcome.elapsed);
    if let Some(label) = &step.report {
        eprintln!("MEASURED docs/runbooks/{name}:{}: {label}: {}", step.line, outcome.text().trim_end());
    }
    if let (Some(load), Some(check)) = (load, step.load) {
        load.wait_for_more(100);
        let (fresh, kept) = load.stop();
        let line = format!(
            "docs/runbooks/{name}:{}: the block took {} ms; fresh connections: {} ok, {} refused, {} failed; \
             keep-alive: {} ok, {} refused, {} failed ({} on connections closed unannounced), {} reconnects after Connection: close; failures: {:?} {:?}",
            step.line,
            outcome.elapsed.as_millis(),
            fresh.ok,
            fresh.refused,
            fresh.failed,
            kept.ok,
            kept.refused,
            kept.failed,
            kept.closed_unannounced,
            kept.reconnects,
            fresh.samples,
            kept.samples,
        );
        if check.lossless {
            let lost = fresh.refused + fresh.failed + kept.refused + kept.failed;
            assert_eq!(lost, 0, "requests lost under load: {line}");
        } else {
            eprintln!("MEASURED {line}");
        }
    }
}

/// Runs `f` on a thread that joined the box's network namespace; threads `f` starts are in it
/// too (a network namespace belongs to a thread, and a new thread inherits its creator's), so
/// the clients of a [`MixedLoad`] started there reach the box's own loopback.
pub(crate) fn in_network_of<T: Send + 'static>(sdbox: &SdBox, f: impl FnOnce() -> T + Send + 'static) -> T {
    let status = Command::new(sdbox::SCRIPT)
        .arg("status")
        .env("SDBOX_NAME", sdbox.name())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", sdbox::SCRIPT));
    let status = String::from_utf8_lossy(&status.stdout);
    let leader = status
        .split_whitespace()
        .find_map(|w| w.strip_prefix("leader="))
        .and_then(|pid| pid.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no leader pid in `sdbox status`: {status}"));
    let netns = File::open(format!("/proc/{leader}/ns/net")).expect("the box's network namespace");
    std::thread::spawn(move || {
        // SAFETY: a valid namespace fd; CLONE_NEWNET moves only this thread.
        let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns into the box's network: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the thread in the box's network panicked")
}
