//! The Debian package, installed with apt in a throw-away machine with systemd as PID 1
//! (`tests/sdbox`): one worker per CPU of the machine that boots, the same after a reboot onto
//! more CPUs, an upgrade under load that fails no request, edits of /etc/sdcluster/app.toml
//! followed, remove and reinstall, and a purge that leaves nothing behind.
//!
//! Tests `target/debian/sdcluster_VERSION-*.deb` (the newest; `./dev package` builds it), or
//! the file `SDCLUSTER_DEB` names. Without one the tests are skipped, unless `CI` is set: then
//! they fail. Needs root (skipped otherwise, off CI). The lifecycle test's box shares the
//! host's network, where the package's default app listens on 127.0.0.1:8080.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sdcluster::status::ClusterStatus;
use sdcluster_tests::TestDir;
use sdcluster_tests::http;
use sdcluster_tests::load::{Load, Reuse};
use sdcluster_tests::sdbox::{Boot, SdBox};
use sdcluster_tests::wait_until;

/// `listen` in packaging/app.toml.
const DEFAULT_ADDR: &str = "127.0.0.1:8080";
const GUEST_DEB: &str = "/tmp/sdcluster.deb";
const GUEST_UPGRADE: &str = "/tmp/sdcluster-upgrade.deb";

fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The .deb under test; `None` (with a note) when there is none and this is not CI.
fn package() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("SDCLUSTER_DEB") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "SDCLUSTER_DEB={}: no such file", path.display());
        return Some(path);
    }
    // The test runs from TARGET/PROFILE/deps/; the package is in TARGET/debian/.
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe.ancestors().nth(3).expect("the target directory").join("debian");
    let prefix = format!("sdcluster_{}-", env!("CARGO_PKG_VERSION"));
    let newest = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb")))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path());
    if newest.is_none() {
        let why = format!("no {}/{prefix}*.deb: build it with ./dev package", dir.display());
        assert!(!on_ci(), "{why}");
        eprintln!("SKIPPED: {why}");
    }
    newest
}

/// `apt-get -y ARGS` in the box, as an admin would run it; its output.
fn apt(sdbox: &SdBox, args: &[&str]) -> String {
    let mut argv = vec!["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-q", "-o", "Dpkg::Use-Pty=0"];
    argv.extend(args);
    sdbox.exec_ok(&argv)
}

/// How many CPUs the box's systemd (and so the generator) may run on.
fn guest_cpus(sdbox: &SdBox) -> u32 {
    let status = sdbox.exec_ok(&["cat", "/proc/1/status"]);
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).expect("Cpus_allowed_list");
    cpu_list(list.trim()).len() as u32
}

/// The CPUs of a list such as `0-3,6`.
fn cpu_list(list: &str) -> Vec<u32> {
    list.split(',')
        .flat_map(|range| {
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            let (a, b): (u32, u32) = (a.parse().expect("a CPU number"), b.parse().expect("a CPU number"));
            a..=b
        })
        .collect()
}

/// A CPU this test may run on, to pin a box to.
fn one_host_cpu() -> String {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).expect("Cpus_allowed_list");
    cpu_list(list.trim())[0].to_string()
}

/// `app@1.service` … `app@N.service`.
fn workers(n: u32) -> Vec<String> {
    (1..=n).map(|k| format!("app@{k}.service")).collect()
}

/// The workers app.target wants, in order.
fn wanted(sdbox: &SdBox) -> Vec<String> {
    let mut wanted: Vec<(u32, String)> = sdbox
        .property("app.target", "Wants")
        .split_whitespace()
        .filter_map(|u| Some((u.strip_prefix("app@")?.strip_suffix(".service")?.parse().ok()?, u.to_owned())))
        .collect();
    wanted.sort();
    wanted.into_iter().map(|(_, u)| u).collect()
}

/// Waits until app.target wants exactly `n` workers and all of them are active.
fn expect_workers(sdbox: &SdBox, n: u32) {
    let want = workers(n);
    let got = wait_until(Duration::from_secs(30), || {
        let got = wanted(sdbox);
        (got == want).then_some(got)
    });
    assert!(got.is_some(), "app.target wants {:?}, not {want:?}\n{}", wanted(sdbox), sdbox.diagnose("app*"));
    for unit in &want {
        sdbox.wait_active(unit);
    }
    assert_eq!(sdbox.property(&format!("app@{}.service", n + 1), "ActiveState"), "inactive");
}

/// The workers that answer `n` connections opened at once (the balance spreads them).
fn workers_answering(addr: SocketAddr, n: usize) -> BTreeSet<String> {
    http::connect_burst(addr, n)
        .iter_mut()
        .map(|c| c.get("/").expect("GET /").worker().expect("x-sdcluster-worker").to_owned())
        .collect()
}

fn numbers(n: u32) -> BTreeSet<String> {
    (1..=n).map(|k| k.to_string()).collect()
}

fn main_pids(sdbox: &SdBox, n: u32) -> Vec<String> {
    workers(n).iter().map(|u| sdbox.property(u, "MainPID")).collect()
}

/// The package with a higher version and otherwise the same files, as a rebuild would be:
/// (its path, its version).
fn rebuilt(deb: &Path, dir: &TestDir) -> (PathBuf, String) {
    let tree = dir.join("tree");
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(Command::new("dpkg-deb").arg("--raw-extract").arg(deb).arg(&tree));
    let control_path = tree.join("DEBIAN/control");
    let control = std::fs::read_to_string(&control_path).expect("DEBIAN/control");
    let version = control.lines().find_map(|l| l.strip_prefix("Version: ")).expect("a Version field");
    let upgrade = format!("{version}+rebuild1");
    std::fs::write(&control_path, control.replace(&format!("Version: {version}\n"), &format!("Version: {upgrade}\n")))
        .expect("write DEBIAN/control");
    let out = dir.join("upgrade.deb");
    run(Command::new("dpkg-deb").args(["--root-owner-group", "-Zgzip", "--build"]).arg(&tree).arg(&out));
    (out, upgrade)
}

/// Install on one CPU, reboot onto all, upgrade under load, remove, reinstall, purge.
#[test]
fn install_reboot_upgrade_remove_purge() {
    let Some(deb) = package() else { return };
    let started = Instant::now();
    let boot = Boot { persistent: true, cpus: Some(one_host_cpu()), private_network: false };
    let Some(sdbox) = SdBox::up_with(&format!("package-{}", std::process::id()), &boot) else { return };
    let addr: SocketAddr = DEFAULT_ADDR.parse().unwrap();
    // The box shares the host's network, so the package's default port must be free here.
    if let Err(e) = TcpListener::bind(addr) {
        panic!("{addr} is taken on this host ({e}): the package's default app needs it (`ss -ltnp` names the holder)");
    }
    let phase = |what: &str| eprintln!("[{:>5.1?}] {what}", started.elapsed());

    // Install on a machine with one CPU: one worker, enabled and started.
    sdbox.copy_in(&deb, GUEST_DEB);
    phase("installing");
    let out = apt(&sdbox, &["install", GUEST_DEB]);
    assert!(out.contains("Setting up sdcluster"), "{out}");
    let version = sdbox.exec_ok(&["dpkg-query", "-W", "-f", "${Version}", "sdcluster"]);
    assert_eq!(guest_cpus(&sdbox), 1);
    expect_workers(&sdbox, 1);
    assert_eq!(workers_answering(addr, 10), numbers(1));
    for link in ["sockets.target.wants/app.socket", "multi-user.target.wants/app.target"] {
        sdbox.exec_ok(&["test", "-L", &format!("/etc/systemd/system/{link}")]);
    }
    // The generator's units are the ones systemd runs; the copies the package ships (which
    // deb-systemd-helper reads) say the same but for their header and the settings of newer
    // systemd versions than the oldest the package supports.
    assert_eq!(sdbox.property("app@1.service", "FragmentPath"), "/run/systemd/generator/app@.service");
    for unit in ["app.socket", "app.service", "app@.service", "app.target"] {
        let body = |dir: &str| {
            let path = format!("{dir}/{unit}");
            sdbox.exec_ok(&["grep", "-v", "-e", "^#", "-e", "^RestartSteps=", "-e", "^RestartMaxDelaySec=", &path])
        };
        assert_eq!(body("/usr/lib/systemd/system"), body("/run/systemd/generator"), "{unit}");
    }
    let status: ClusterStatus =
        serde_json::from_str(&sdbox.exec_ok(&["sdcluster", "status", "app", "--json"])).expect("status --json");
    assert_eq!((status.listen, status.instances.len()), (vec![DEFAULT_ADDR.to_owned()], 1));
    let conffiles = sdbox.exec_ok(&["dpkg-query", "-W", "-f", "${Conffiles}", "sdcluster"]);
    assert!(conffiles.contains("/etc/sdcluster/app.toml"), "{conffiles}");
    let files = sdbox.exec_ok(&["dpkg", "-L", "sdcluster"]);
    for path in [
        "/usr/bin/sdcluster",
        "/usr/bin/sdcluster-worker",
        "/usr/lib/systemd/system-generators/sdcluster-generator",
        "/usr/lib/systemd/system/app@.service",
        "/usr/share/man/man1/sdcluster.1.gz",
        "/usr/share/man/man1/sdcluster-worker.1.gz",
        "/usr/share/bash-completion/completions/sdcluster",
        "/usr/share/zsh/vendor-completions/_sdcluster",
        "/usr/share/fish/vendor_completions.d/sdcluster.fish",
    ] {
        assert!(files.lines().any(|l| l == path), "{path} is not in the package:\n{files}");
    }

    // The same machine boots with every CPU: the generator counts them again.
    phase("rebooting");
    sdbox.reboot(&Boot::default());
    let cpus = guest_cpus(&sdbox);
    expect_workers(&sdbox, cpus);
    assert_eq!(workers_answering(addr, 10 * cpus as usize), numbers(cpus));

    // An upgrade under load: the new binary takes over worker by worker, nothing fails.
    let scratch = TestDir::new("package");
    let (upgrade, new_version) = rebuilt(&deb, &scratch);
    sdbox.copy_in(&upgrade, GUEST_UPGRADE);
    let before = main_pids(&sdbox, cpus);
    let socket_since = sdbox.property("app.socket", "ActiveEnterTimestampMonotonic");
    let fresh = Load::start(addr, "/", 3, Reuse::Fresh);
    let kept = Load::start(addr, "/", 3, Reuse::KeepAlive);
    fresh.wait_for_more(200);
    phase(&format!("upgrading {version} -> {new_version} under load"));
    let out = apt(&sdbox, &["install", GUEST_UPGRADE]);
    assert!(out.contains(&format!("restarted {cpus} instances")), "{out}");
    fresh.wait_for_more(200);
    kept.wait_for_more(200);
    let (fresh, kept) = (fresh.stop(), kept.stop());
    eprintln!("upgrade under load: fresh {fresh:?}, keep-alive {kept:?}");
    for report in [&fresh, &kept] {
        assert_eq!((report.refused, report.failed), (0, 0), "{report:?}");
    }
    assert_eq!(sdbox.exec_ok(&["dpkg-query", "-W", "-f", "${Version}", "sdcluster"]), new_version);
    let after = main_pids(&sdbox, cpus);
    assert!(before.iter().zip(&after).all(|(b, a)| b != a), "every worker replaced: {before:?} -> {after:?}");
    for pid in &after {
        // A worker still on the old binary would show "/usr/bin/sdcluster-worker (deleted)".
        assert_eq!(sdbox.exec_ok(&["readlink", &format!("/proc/{pid}/exe")]), "/usr/bin/sdcluster-worker");
    }
    assert_eq!(sdbox.property("app.socket", "ActiveEnterTimestampMonotonic"), socket_since, "the socket stayed up");

    // Remove: stopped, disabled, the units gone; the configuration stays until a purge.
    phase("removing");
    apt(&sdbox, &["remove", "sdcluster"]);
    assert_eq!(sdbox.exec_ok(&["dpkg-query", "-W", "-f", "${Status}", "sdcluster"]), "deinstall ok config-files");
    let refused = TcpStream::connect(addr).map(drop).expect_err("nothing listens after remove");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");
    for unit in ["app.socket", "app.target", "app.service", "app@1.service"] {
        assert_eq!(sdbox.property(unit, "LoadState"), "not-found", "{unit}");
    }
    let pgrep = sdbox.exec(&["pgrep", "-a", "-f", "/usr/bin/sdcluster-worker"]);
    assert_eq!(pgrep.status.code(), Some(1), "workers still run: {}", String::from_utf8_lossy(&pgrep.stdout));
    let leftovers = sdbox.sh_ok(concat!(
        "ls -d /run/systemd/generator/app* /run/sdcluster /run/private/sdcluster ",
        "/etc/systemd/system/*.wants/app* 2>/dev/null || true"
    ));
    assert_eq!(leftovers, "", "left after remove");
    sdbox.exec_ok(&["test", "-f", "/etc/sdcluster/app.toml"]);

    // A reinstall brings the app back, enabled as by a first install.
    phase("reinstalling");
    apt(&sdbox, &["install", GUEST_UPGRADE]);
    expect_workers(&sdbox, cpus);
    assert_eq!(workers_answering(addr, 10 * cpus as usize), numbers(cpus));
    apt(&sdbox, &["remove", "sdcluster"]);

    // Purge: nothing of the package's is left.
    phase("purging");
    apt(&sdbox, &["purge", "sdcluster"]);
    assert!(!sdbox.exec(&["dpkg-query", "-W", "sdcluster"]).status.success(), "dpkg still knows sdcluster");
    // Every path the package had is gone, but directories that hold other packages' files
    // (each file of ours is on the list itself). dpkg can't always name their owner: with
    // merged /usr, systemd owns /lib/systemd/system-generators, our /usr/lib/... is the same.
    let left = sdbox.exec_with_input(
        &[
            "sh",
            "-c",
            "while read -r p; do \
               if [ -d \"$p\" ] && [ ! -L \"$p\" ]; then [ -z \"$(ls -A \"$p\")\" ] && echo \"$p\"; \
               elif [ -e \"$p\" ] || [ -L \"$p\" ]; then echo \"$p\"; fi; \
             done",
        ],
        files.as_bytes(),
    );
    assert_eq!(String::from_utf8_lossy(&left.stdout), "", "left after purge of `dpkg -L sdcluster`");
    let named = sdbox.sh_ok(
        "find /etc /usr /var/lib /run -xdev \\( -name '*sdcluster*' -o -name 'app.socket*' -o -name 'app.service' \
         -o -name 'app.target*' -o -name 'app@*' -o -name 'sdc-app*' \\) -print",
    );
    assert_eq!(named, "", "files named after the package or its app left after purge");
    assert!(!sdbox.exec(&["getent", "passwd", "sdc-app"]).status.success(), "the workers' user is left");
    phase("done");
}

/// Edits of /etc/sdcluster/app.toml reach the units at the next daemon-reload, applied as
/// README.md and the file's own comment say.
#[test]
fn the_generator_follows_edits_of_the_app_config() {
    let Some(deb) = package() else { return };
    // A network of its own: the default port may be in use on the host or by the other test.
    let boot = Boot { private_network: true, ..Boot::default() };
    let Some(sdbox) = SdBox::up_with(&format!("package-edit-{}", std::process::id()), &boot) else { return };
    sdbox.copy_in(&deb, GUEST_DEB);
    apt(&sdbox, &["install", GUEST_DEB]);
    expect_workers(&sdbox, guest_cpus(&sdbox));
    let http_code = |port: u16| sdbox.sh(&format!("curl -s -o /dev/null -w %{{http_code}} http://127.0.0.1:{port}/"));
    assert_eq!(String::from_utf8_lossy(&http_code(8080).stdout), "200");

    let apply = |listen: &str, instances: &str| {
        sdbox.exec_ok(&[
            "sed",
            "-i",
            "-e",
            &format!("s/^listen = .*/listen = [\"{listen}\"]/"),
            "-e",
            &format!("s/^instances = .*/instances = {instances}/"),
            "/etc/sdcluster/app.toml",
        ]);
        sdbox.sh_ok(
            "sdcluster generate app >/dev/null && systemctl daemon-reload && systemctl restart app.socket \
             && systemctl stop app.target && systemctl start app.target",
        );
    };
    apply("127.0.0.1:9090", "3");
    expect_workers(&sdbox, 3);
    assert_eq!(String::from_utf8_lossy(&http_code(9090).stdout), "200");
    assert_eq!(http_code(8080).status.code(), Some(7), "curl: nothing listens on the old port any more");
    apply("127.0.0.1:9090", "1");
    expect_workers(&sdbox, 1);
    for k in 2..=3 {
        assert_eq!(sdbox.property(&format!("app@{k}.service"), "ActiveState"), "inactive");
    }

    // A mistake is caught by the check before the reload, with its line.
    sdbox.exec_ok(&["sed", "-i", "s/^instances = .*/instances = 0/", "/etc/sdcluster/app.toml"]);
    let check = sdbox.exec(&["sdcluster", "generate", "app"]);
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success() && err.contains("would serve nothing"), "{err}");
}
