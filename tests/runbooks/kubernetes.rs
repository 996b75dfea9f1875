//! The Kubernetes example (`docs/runbooks/k8s/`): no cluster here, so it is parsed,
//! cross-checked, and its command run as the pod would run it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sdcluster_tests::deb::on_ci;
use sdcluster_tests::sdbox::{Boot, SdBox};
use sdcluster_tests::worker_binary;

use crate::markdown::parse_duration;
use crate::runbook_path;

/// `docs/runbooks/k8s/NAME`.
fn k8s_path(name: &str) -> PathBuf {
    runbook_path("k8s").join(name)
}

/// Every document of a YAML file, as JSON, through PyYAML (`python3-yaml`); `None` (with a
/// note) when PyYAML is missing and this is not CI.
fn yaml_documents(path: &Path) -> Option<Vec<serde_json::Value>> {
    let script = "import json, sys, yaml\nprint(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))";
    let out = Command::new("python3").args(["-c", script]).arg(path).output();
    match out {
        Ok(out) if out.status.success() => {
            Some(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display())))
        }
        Ok(out) if String::from_utf8_lossy(&out.stderr).contains("No module named 'yaml'") => {
            let why = "PyYAML is missing: apt-get install python3-yaml";
            assert!(!on_ci(), "{why}");
            eprintln!("SKIPPED: {why}");
            None
        }
        Ok(out) => panic!("{} is not valid YAML:\n{}", path.display(), String::from_utf8_lossy(&out.stderr)),
        Err(e) => panic!("python3: {e}"),
    }
}

/// The value at `path` (object keys, or array indices as numbers) in `value`, or a panic
/// naming what is missing.
fn at<'a>(value: &'a serde_json::Value, path: &str) -> &'a serde_json::Value {
    path.split('.').fold(value, |v, key| {
        let next = match key.parse::<usize>() {
            Ok(i) => v.get(i),
            Err(_) => v.get(key),
        };
        next.unwrap_or_else(|| panic!("k8s/web.yaml has no {path} (stopped at {key:?})"))
    })
}

fn text(value: &serde_json::Value) -> &str {
    value.as_str().unwrap_or_else(|| panic!("{value} is not a string"))
}

/// The strings of a YAML sequence.
fn strings(value: &serde_json::Value) -> Vec<String> {
    value.as_array().unwrap_or_else(|| panic!("{value} is not a list")).iter().map(|v| text(v).to_owned()).collect()
}

/// The value after `flag` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("the container's args lack {flag}"));
    args.get(i + 1).unwrap_or_else(|| panic!("{flag} has no value"))
}

#[test]
fn the_kubernetes_manifest_fits_together_and_its_command_serves_and_drains() {
    let Some(docs) = yaml_documents(&k8s_path("web.yaml")) else { return };
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap_or_else(|| panic!("k8s/web.yaml has no {k}"));
    let (deployment, service, budget) = (kind("Deployment"), kind("Service"), kind("PodDisruptionBudget"));
    let pod = at(deployment, "spec.template.spec");
    let labels = at(deployment, "spec.template.metadata.labels");
    let container = at(pod, "containers.0");
    let command = strings(at(container, "command"));
    let args = strings(at(container, "args"));
    let port = at(container, "ports.0");
    let port_number = at(port, "containerPort").as_u64().expect("containerPort is a number");
    let port_name = text(at(port, "name"));

    // The worker binds the port the pod declares, and the probes and the Service use it.
    let listen: SocketAddr = flag(&args, "--listen").parse().expect("--listen is HOST:PORT");
    assert_eq!(u64::from(listen.port()), port_number, "--listen and containerPort");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(at(container, &format!("{probe}.httpGet.path")), "/healthz", "{probe}");
        let probed = at(container, &format!("{probe}.httpGet.port"));
        assert!(probed == port_name || probed.as_u64() == Some(port_number), "{probe} port {probed}");
    }
    assert_eq!(at(deployment, "spec.selector.matchLabels"), labels, "the Deployment selects its pods");
    for (what, selector) in
        [("Service", at(service, "spec.selector")), ("PDB", at(budget, "spec.selector.matchLabels"))]
    {
        for (key, value) in selector.as_object().expect("a selector map") {
            assert_eq!(labels.get(key), Some(value), "the {what} selects the pods by {key}");
        }
    }
    let target = at(service, "spec.ports.0.targetPort");
    assert!(target == port_name || target.as_u64() == Some(port_number), "the Service's targetPort {target}");

    // preStop sleep + drain timeout, with a margin, within the grace period.
    let grace = at(pod, "terminationGracePeriodSeconds").as_u64().expect("a grace period in seconds");
    let pre_stop = strings(at(container, "lifecycle.preStop.exec.command"));
    assert_eq!(pre_stop[0], "sleep");
    let sleep: u64 = pre_stop[1].parse().expect("sleep SECONDS");
    let drain = parse_duration(flag(&args, "--drain-timeout")).expect("--drain-timeout like 20s").as_secs();
    assert!(sleep + drain < grace, "preStop {sleep}s + drain {drain}s must stay below the grace period {grace}s");

    // The image puts the binary where the manifest runs it.
    let containerfile = std::fs::read_to_string(k8s_path("Containerfile")).expect("k8s/Containerfile");
    let copy = containerfile.lines().find(|l| l.starts_with("COPY ")).expect("a COPY line");
    assert_eq!(copy.split_whitespace().last(), Some(command[0].as_str()), "Containerfile COPY and the command");

    // The container's command, run as the pod would (in a box with its own network): ready on
    // the probe's path, then SIGTERM, and out with status 0 well within the grace period.
    let boot = Boot { private_network: true, ..Boot::default() };
    let Some(sdbox) = SdBox::up_with(&format!("runbook-k8s-{}", std::process::id()), &boot) else { return };
    sdbox.copy_in(worker_binary(), &command[0]);
    let mut run =
        vec!["systemd-run", "--unit", "pod", "--property", "KillMode=mixed", "--setenv=SDCLUSTER_INSTANCE=web-0"];
    run.extend(command.iter().chain(&args).map(String::as_str));
    sdbox.exec_ok(&run);
    let probe = format!("http://127.0.0.1:{port_number}/healthz");
    let answered = sdcluster_tests::wait_until(Duration::from_secs(10), || {
        let out = sdbox.exec(&["curl", "-fsS", &probe]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    assert_eq!(answered.as_deref(), Some("ok\n"), "the pod's readiness probe\n{}", sdbox.diagnose("pod.service"));
    let stopping = Instant::now();
    sdbox.systemctl(&["kill", "--signal=SIGTERM", "pod.service"]);
    let stopped = sdcluster_tests::wait_until(Duration::from_secs(grace), || {
        (sdbox.property("pod.service", "ActiveState") != "active").then_some(())
    });
    assert!(stopped.is_some(), "the pod did not stop within its grace period\n{}", sdbox.diagnose("pod.service"));
    let journal = sdbox.exec_ok(&["journalctl", "-u", "pod.service", "--no-pager", "-o", "cat"]);
    assert!(journal.contains("drained; exiting"), "{journal}");
    assert!(journal.contains("Deactivated successfully"), "exit status 0:\n{journal}");
    eprintln!("the pod's command: ready, then out {:.0?} after SIGTERM", stopping.elapsed());
}
