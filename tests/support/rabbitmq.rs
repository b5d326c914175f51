//! A real RabbitMQ (Debian's `rabbitmq-server` 3.10, MQTT plugin) as a
//! child process, on free loopback ports: its MQTT listener over TLS with
//! client certificates required, its Erlang port mapper and distribution
//! port moved off their well-known ports. RabbitMQ 3.10 speaks MQTT 3.1.1
//! only, and answers a QoS 2 PUBLISH with PUBACK: the broker hospitals run
//! that has no QoS 2.
//!
//! It runs in its own process group (it starts `beam.smp`, `epmd` and
//! helpers), which is killed whole on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hearth::certs::DevCerts;

use super::{free_port, wait_for};

/// Its boot (the Erlang VM, Mnesia, the plugin) takes a few seconds.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

pub struct RabbitMq {
    /// The MQTT-over-TLS listener's port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    /// The port of the Erlang port mapper it starts (a daemon of its own).
    epmd: u16,
    child: Option<Child>,
}

impl RabbitMq {
    /// Starts a node whose files live in `dir`; returns once its MQTT TLS
    /// listener accepts connections. Clients must present a certificate
    /// from `certs.ca_cert`; they log in as the default user.
    #[track_caller]
    pub fn start(dir: &Path, certs: &DevCerts) -> RabbitMq {
        let server = Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
        assert!(
            server.exists(),
            "RabbitMQ is not installed: `apt-get install rabbitmq-server` (scripts/test.sh does)"
        );
        fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let amqp = free_port();
        let dist = free_port();
        let epmd = free_port();
        let conf = dir.join("rabbitmq.conf");
        fs::write(
            &conf,
            format!(
                "# Written by tests/support/rabbitmq.rs.\n\
                 listeners.tcp.1 = 127.0.0.1:{amqp}\n\
                 mqtt.listeners.tcp = none\n\
                 mqtt.listeners.ssl.1 = 127.0.0.1:{port}\n\
                 mqtt.allow_anonymous = true\n\
                 mqtt.default_user = guest\n\
                 mqtt.default_pass = guest\n\
                 loopback_users = none\n\
                 ssl_options.cacertfile = {ca}\n\
                 ssl_options.certfile = {cert}\n\
                 ssl_options.keyfile = {key}\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n\
                 log.file.level = debug\n",
                ca = certs.ca_cert.display(),
                cert = certs.server_cert.display(),
                key = certs.server_key.display(),
            ),
        )
        .unwrap();
        let home = dir.join("home");
        fs::create_dir_all(&home).unwrap();
        let mut command = Command::new(server);
        command
            .env("HOME", &home)
            .env("RABBITMQ_NODENAME", format!("hearth-{port}@localhost"))
            .env("RABBITMQ_CONFIG_FILE", &conf)
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_ENABLED_PLUGINS", "rabbitmq_mqtt")
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("ERL_EPMD_PORT", epmd.to_string())
            .env("RABBITMQ_PID_FILE", dir.join("rabbitmq.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(fs::File::create(dir.join("stdout")).unwrap()))
            .stderr(Stdio::from(fs::File::create(dir.join("stderr")).unwrap()));
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().expect("start rabbitmq-server");
        let rabbit = RabbitMq {
            port,
            dir: dir.to_owned(),
            epmd,
            child: Some(child),
        };
        wait_for(READY_TIMEOUT, "RabbitMQ's MQTT TLS listener", || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        });
        rabbit
    }

    /// Its log and console, for failure messages.
    pub fn log(&self) -> String {
        let mut all = String::new();
        for name in ["stdout", "stderr"] {
            all.push_str(&fs::read_to_string(self.dir.join(name)).unwrap_or_default());
        }
        if let Ok(entries) = fs::read_dir(self.dir.join("log")) {
            for entry in entries.flatten() {
                all.push_str(&fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        all
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The whole group: beam.smp, epmd, erl_child_setup.
            // SAFETY: a plain kill(2) of our own process group.
            unsafe {
                libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
            }
            let _ = child.wait();
        }
        // epmd daemonised itself out of the group.
        let _ = Command::new("epmd")
            .args(["-port", &self.epmd.to_string(), "-kill"])
            .env("ERL_EPMD_PORT", self.epmd.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
