//! Shared by the fuzz targets: the properties every rendered unit must have, and the
//! structured input of the `render` target.

pub mod properties;

use std::collections::BTreeMap;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use sdcluster::spec::{Balance, CommandLine, InstancesValue, Readiness, SpecFile};

/// A value the fuzzer picks: one of a few that validation accepts, or any string (so that
/// values with quotes, `%`, `$`, backslashes and control characters reach the renderer).
#[derive(Debug, Arbitrary)]
pub enum Pick {
    /// The n-th good value of the key.
    Good(u8),
    /// Anything.
    Raw(String),
}

impl Pick {
    fn get(&self, good: &[&str]) -> String {
        match self {
            Pick::Good(n) => good[*n as usize % good.len()].to_owned(),
            Pick::Raw(s) => s.clone(),
        }
    }
}

/// Every key of a spec file, each most often valid.
#[derive(Debug, Arbitrary)]
pub struct Input {
    name: Pick,
    program: Pick,
    args: Vec<String>,
    listen: Option<Vec<Pick>>,
    instances: Option<i16>,
    environment: BTreeMap<String, String>,
    environment_keys: Vec<(u8, String)>,
    restart_delay: Option<Pick>,
    restart_max_delay: Option<Pick>,
    watchdog: Option<Pick>,
    stop_timeout: Option<Pick>,
    memory_max: Option<Pick>,
    reuseport: Option<bool>,
    user: Option<Pick>,
    outbound_network: Option<bool>,
    handover_max: Option<u32>,
    exec: Option<bool>,
    jit: Option<bool>,
    state_directory: Option<Pick>,
    read_write_paths: Option<Vec<Pick>>,
    working_directory: Option<Pick>,
    environment_file: Option<Pick>,
    credentials: Option<Vec<(Pick, Pick)>>,
}

const NAMES: &[&str] = &["web", "app", "api.v2", "a"];
const PROGRAMS: &[&str] = &["/usr/bin/sdcluster-worker", "/opt/sd cluster/w", "/srv/100%/w", "/usr/bin/node"];
const LISTEN: &[&str] =
    &["127.0.0.1:8080", "*:80", "[::]:80", "unix:/run/a.sock", "unix:/run/100%i.sock", "[fe80::1%2]:80"];
const DURATIONS: &[&str] = &["100ms", "10s", "0", "0ms", "1.5s", "2min", "250us", "off"];
const MEMORY: &[&str] = &["512M", "2G", "50%", "infinity", "100%"];
const USERS: &[&str] = &["www-data", "nobody", "app_1"];
const STATE: &[&str] = &["web", "web/cache", ".hidden"];
const PATHS: &[&str] = &["/srv/web", "/srv/100%", "/srv/web%i", "/etc/web/env", "/"];
const ENV_KEYS: &[&str] = &["A", "RUST_LOG", "_X", "SDCLUSTER_INSTANCE"];
const CREDENTIALS: &[&str] = &["db", "tls.key", "db-password"];

impl Input {
    /// The spec file this input stands for.
    pub fn spec_file(&self) -> SpecFile {
        let mut file = SpecFile::default();
        file.name = Some(self.name.get(NAMES));
        let mut argv = vec![self.program.get(PROGRAMS)];
        argv.extend(self.args.iter().cloned());
        file.command = Some(CommandLine::Argv(argv));
        file.listen = self.listen.as_ref().map(|l| l.iter().map(|p| p.get(LISTEN)).collect());
        file.instances = self.instances.map(|n| InstancesValue::Count(n.into()));
        let mut environment = self.environment.clone();
        for (k, v) in &self.environment_keys {
            environment.insert(ENV_KEYS[*k as usize % ENV_KEYS.len()].to_owned(), v.clone());
        }
        file.environment = Some(environment);
        file.restart_delay = self.restart_delay.as_ref().map(|p| p.get(DURATIONS));
        file.restart_max_delay = self.restart_max_delay.as_ref().map(|p| p.get(DURATIONS));
        file.watchdog = self.watchdog.as_ref().map(|p| p.get(DURATIONS));
        file.stop_timeout = self.stop_timeout.as_ref().map(|p| p.get(DURATIONS));
        file.memory_max = self.memory_max.as_ref().map(|p| p.get(MEMORY));
        file.balance = self.reuseport.map(|r| if r { Balance::Reuseport } else { Balance::Shared });
        file.user = self.user.as_ref().map(|p| p.get(USERS));
        file.outbound_network = self.outbound_network;
        file.handover_max = self.handover_max.map(i64::from);
        file.ready = self.exec.map(|e| if e { Readiness::Exec } else { Readiness::Notify });
        file.jit = self.jit;
        file.state_directory = self.state_directory.as_ref().map(|p| p.get(STATE));
        file.read_write_paths = self.read_write_paths.as_ref().map(|l| l.iter().map(|p| p.get(PATHS)).collect());
        file.working_directory = self.working_directory.as_ref().map(|p| p.get(PATHS));
        file.environment_file = self.environment_file.as_ref().map(|p| p.get(PATHS));
        file.credentials =
            self.credentials.as_ref().map(|l| l.iter().map(|(n, p)| (n.get(CREDENTIALS), p.get(PATHS))).collect());
        file
    }
}
