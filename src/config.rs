//! Settings: defaults, optional TOML file, `PUNICA_*` environment, CLI flags — in that order of
//! precedence, lowest first.
//!
//! Every source is read into one [`SettingsLayer`] (all fields optional); layers are stacked and
//! then validated into [`Settings`]. The file layer rejects unknown keys so a typo fails the start
//! instead of being silently ignored. Environment and flags come in together through clap (each
//! flag has an env twin, and clap already lets a flag beat its env var). Secrets live in
//! [`Secret`], whose `Debug` and `Display` print `[redacted]`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

/// Default listen address.
pub const DEFAULT_BIND: &str = "127.0.0.1:8080";
/// Default data directory (adapter blobs and the managed Postgres cluster), relative to the
/// working directory.
pub const DEFAULT_DATA_DIR: &str = "data";
/// Default largest accepted upload (an adapter's files together), in bytes.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 512 * 1024 * 1024;
/// Default share of GPU memory the engine may use.
pub const DEFAULT_GPU_MEMORY_FRACTION: f64 = 0.9;
/// Default log filter (sqlx's per-statement notices are noise at info level).
pub const DEFAULT_LOG: &str = "info,sqlx=warn";

/// A value that must never appear in logs: `Debug` and `Display` print `[redacted]`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The secret itself; call only where the value is really needed (auth checks, connecting).
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl FromStr for Secret<String> {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// Which device the engine runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The f32 reference backend.
    Cpu,
    /// The CUDA backend; fails at start when no GPU is usable.
    Cuda,
    /// CUDA when a GPU is usable, else CPU.
    Auto,
}

impl FromStr for DeviceChoice {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda),
            "auto" => Ok(DeviceChoice::Auto),
            _ => Err(ConfigError::Invalid {
                key: "device",
                message: format!("`{s}` is not one of cpu, cuda, auto"),
            }),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
            DeviceChoice::Auto => "auto",
        })
    }
}

/// Why the configuration could not be assembled. One line each, naming the key or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML or has unknown keys / wrong types.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is out of range or malformed.
    #[error("invalid setting `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// One source of settings; every field is optional so layers can be stacked.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsLayer {
    pub bind: Option<String>,
    pub model: Option<PathBuf>,
    pub device: Option<DeviceChoice>,
    pub database_url: Option<Secret<String>>,
    pub data_dir: Option<PathBuf>,
    pub admin_token: Option<Secret<String>>,
    pub max_upload_bytes: Option<u64>,
    pub gpu_memory_fraction: Option<f64>,
    pub log: Option<String>,
}

impl SettingsLayer {
    /// Reads a TOML file; unknown keys are an error.
    pub fn from_file(path: &Path) -> Result<SettingsLayer, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            // toml's message spans several lines (it quotes the offending line); keep the first.
            message: one_line(e.message()),
        })
    }

    /// `other` wins wherever it has a value.
    pub fn overlay(self, other: SettingsLayer) -> SettingsLayer {
        SettingsLayer {
            bind: other.bind.or(self.bind),
            model: other.model.or(self.model),
            device: other.device.or(self.device),
            database_url: other.database_url.or(self.database_url),
            data_dir: other.data_dir.or(self.data_dir),
            admin_token: other.admin_token.or(self.admin_token),
            max_upload_bytes: other.max_upload_bytes.or(self.max_upload_bytes),
            gpu_memory_fraction: other.gpu_memory_fraction.or(self.gpu_memory_fraction),
            log: other.log.or(self.log),
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The validated configuration of one `punica` process.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Listen address (`host:port`; port 0 picks a free port).
    pub bind: String,
    /// Hugging Face style model folder; `None` runs the service without a model.
    pub model: Option<PathBuf>,
    /// Device choice for the engine.
    pub device: DeviceChoice,
    /// External Postgres; `None` runs a private cluster under `data_dir`.
    pub database_url: Option<Secret<String>>,
    /// Adapter blobs and the managed cluster live here.
    pub data_dir: PathBuf,
    /// Operator bearer token for the admin API; with `None` the admin API refuses every request.
    pub admin_token: Option<Secret<String>>,
    /// Largest accepted upload, in bytes.
    pub max_upload_bytes: u64,
    /// Share of GPU memory the engine may use, in (0, 1].
    pub gpu_memory_fraction: f64,
    /// `tracing` filter directive (`info`, `punica=debug,actix_web=info`, ...).
    pub log: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            bind: DEFAULT_BIND.to_owned(),
            model: None,
            device: DeviceChoice::Auto,
            database_url: None,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            admin_token: None,
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            gpu_memory_fraction: DEFAULT_GPU_MEMORY_FRACTION,
            log: DEFAULT_LOG.to_owned(),
        }
    }
}

impl Settings {
    /// Defaults, then the optional file, then `overrides` (environment + flags), then validation.
    pub fn load(file: Option<&Path>, overrides: SettingsLayer) -> Result<Settings, ConfigError> {
        let file_layer = match file {
            Some(path) => SettingsLayer::from_file(path)?,
            None => SettingsLayer::default(),
        };
        Settings::from_layer(file_layer.overlay(overrides))
    }

    /// Fills the gaps of `layer` with defaults and validates the result.
    pub fn from_layer(layer: SettingsLayer) -> Result<Settings, ConfigError> {
        let d = Settings::default();
        let settings = Settings {
            bind: layer.bind.unwrap_or(d.bind),
            model: layer.model.or(d.model),
            device: layer.device.unwrap_or(d.device),
            database_url: layer.database_url.filter(|u| !u.expose().is_empty()),
            data_dir: layer.data_dir.unwrap_or(d.data_dir),
            admin_token: layer.admin_token.filter(|t| !t.expose().is_empty()),
            max_upload_bytes: layer.max_upload_bytes.unwrap_or(d.max_upload_bytes),
            gpu_memory_fraction: layer.gpu_memory_fraction.unwrap_or(d.gpu_memory_fraction),
            log: layer.log.unwrap_or(d.log),
        };
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.bind.parse::<SocketAddr>().is_err() && !looks_like_host_port(&self.bind) {
            return Err(ConfigError::Invalid {
                key: "bind",
                message: format!("`{}` is not a host:port address", self.bind),
            });
        }
        if self.max_upload_bytes == 0 {
            return Err(ConfigError::Invalid {
                key: "max_upload_bytes",
                message: "must be greater than 0".into(),
            });
        }
        if !(self.gpu_memory_fraction > 0.0 && self.gpu_memory_fraction <= 1.0) {
            return Err(ConfigError::Invalid {
                key: "gpu_memory_fraction",
                message: format!("{} is not in (0, 1]", self.gpu_memory_fraction),
            });
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                key: "data_dir",
                message: "must not be empty".into(),
            });
        }
        if let Some(url) = &self.database_url {
            let u = url.expose();
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                return Err(ConfigError::Invalid {
                    key: "database_url",
                    message: "must start with postgres:// or postgresql://".into(),
                });
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log).is_err() {
            return Err(ConfigError::Invalid {
                key: "log",
                message: format!("`{}` is not a valid log filter", self.log),
            });
        }
        Ok(())
    }
}

fn looks_like_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok(),
        None => false,
    }
}

/// Flags of `punica serve` (and the database flags of the other commands), each with its
/// environment twin. clap applies "flag beats env"; the result overlays the config file.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct SettingsArgs {
    /// TOML configuration file (unknown keys are an error).
    #[arg(long = "config", env = "PUNICA_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "PUNICA_BIND", value_name = "HOST:PORT")]
    pub bind: Option<String>,
    /// Hugging Face style model folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long, env = "PUNICA_MODEL", value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// cpu | cuda | auto [default: auto].
    #[arg(long, env = "PUNICA_DEVICE", value_name = "DEVICE")]
    pub device: Option<String>,
    /// External Postgres; without it a private cluster runs under the data dir.
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Adapter blobs and the managed Postgres cluster [default: ./data].
    #[arg(long, env = "PUNICA_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Largest accepted upload in bytes [default: 536870912].
    #[arg(long, env = "PUNICA_MAX_UPLOAD_BYTES", value_name = "BYTES")]
    pub max_upload_bytes: Option<u64>,
    /// Share of GPU memory the engine may use, in (0, 1] [default: 0.9].
    #[arg(long, env = "PUNICA_GPU_MEMORY_FRACTION", value_name = "FRACTION")]
    pub gpu_memory_fraction: Option<f64>,
    /// Log filter, e.g. `info` or `punica=debug` [default: info,sqlx=warn].
    #[arg(long, env = "PUNICA_LOG", value_name = "FILTER")]
    pub log: Option<String>,
}

impl SettingsArgs {
    /// Loads the settings: defaults < file < environment < flags. The admin token comes only from
    /// the file or `PUNICA_ADMIN_TOKEN` (a flag would show it in `ps`).
    pub fn load(&self) -> Result<Settings, ConfigError> {
        let admin_token = std::env::var("PUNICA_ADMIN_TOKEN").ok().map(Secret::new);
        self.load_with_admin_token(admin_token)
    }

    /// [`SettingsArgs::load`] with the admin token given instead of read from the environment.
    pub fn load_with_admin_token(
        &self,
        admin_token: Option<Secret<String>>,
    ) -> Result<Settings, ConfigError> {
        let device = self
            .device
            .as_deref()
            .map(DeviceChoice::from_str)
            .transpose()?;
        let layer = SettingsLayer {
            bind: self.bind.clone(),
            model: self.model.clone(),
            device,
            database_url: self.database_url.clone().map(Secret::new),
            data_dir: self.data_dir.clone(),
            admin_token,
            max_upload_bytes: self.max_upload_bytes,
            gpu_memory_fraction: self.gpu_memory_fraction,
            log: self.log.clone(),
        };
        Settings::load(self.config.as_deref(), layer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_file(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(contents.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults_apply_when_nothing_is_configured() {
        let s = Settings::load(None, SettingsLayer::default()).unwrap();
        assert_eq!(s.bind, DEFAULT_BIND);
        assert_eq!(s.device, DeviceChoice::Auto);
        assert!(s.database_url.is_none());
        assert_eq!(s.data_dir, PathBuf::from("data"));
        assert_eq!(s.max_upload_bytes, DEFAULT_MAX_UPLOAD_BYTES);
    }

    #[test]
    fn file_values_override_defaults_and_overrides_beat_the_file() {
        let f = write_file("bind = \"0.0.0.0:9000\"\ndevice = \"cpu\"\nmax_upload_bytes = 1000\n");
        let overrides = SettingsLayer {
            bind: Some("127.0.0.1:7000".into()),
            ..Default::default()
        };
        let s = Settings::load(Some(f.path()), overrides).unwrap();
        assert_eq!(s.bind, "127.0.0.1:7000");
        assert_eq!(s.device, DeviceChoice::Cpu);
        assert_eq!(s.max_upload_bytes, 1000);
    }

    #[test]
    fn unknown_key_in_file_is_an_error_naming_the_key() {
        let f = write_file("bind = \"127.0.0.1:1\"\ncolour = \"blue\"\n");
        let err = Settings::load(Some(f.path()), SettingsLayer::default()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Parse { .. }));
        assert!(msg.contains("colour"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn flags_beat_the_file_for_every_key() {
        let f = write_file("device = \"cuda\"\nlog = \"debug\"\n");
        let args = SettingsArgs {
            config: Some(f.path().to_owned()),
            device: Some("cpu".into()),
            log: Some("warn".into()),
            ..Default::default()
        };
        let s = args.load_with_admin_token(None).unwrap();
        assert_eq!(s.device, DeviceChoice::Cpu);
        assert_eq!(s.log, "warn");
    }

    #[test]
    fn secrets_are_redacted_in_debug_and_display() {
        let f =
            write_file("admin_token = \"tok-123\"\ndatabase_url = \"postgres://u:hunter2@h/db\"\n");
        let s = Settings::load(Some(f.path()), SettingsLayer::default()).unwrap();
        let debug = format!("{s:?}");
        assert!(!debug.contains("tok-123"), "{debug}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("[redacted]"));
        assert_eq!(s.admin_token.as_ref().unwrap().expose(), "tok-123");
        assert_eq!(s.admin_token.unwrap().to_string(), "[redacted]");
    }

    #[test]
    fn out_of_range_values_are_rejected_with_the_key_name() {
        for (layer, key) in [
            (
                SettingsLayer {
                    gpu_memory_fraction: Some(1.5),
                    ..Default::default()
                },
                "gpu_memory_fraction",
            ),
            (
                SettingsLayer {
                    max_upload_bytes: Some(0),
                    ..Default::default()
                },
                "max_upload_bytes",
            ),
            (
                SettingsLayer {
                    bind: Some("nonsense".into()),
                    ..Default::default()
                },
                "bind",
            ),
            (
                SettingsLayer {
                    database_url: Some(Secret::new("mysql://x".into())),
                    ..Default::default()
                },
                "database_url",
            ),
        ] {
            let err = Settings::from_layer(layer).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn unknown_device_is_rejected() {
        assert!("tpu".parse::<DeviceChoice>().is_err());
        assert_eq!("CUDA".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda);
    }
}
