//! `--device auto|cpu|cuda[:N]|metal`: which backend tensors live on.
//!
//! Parsing is separate from resolution: a spec is validated when the command line is
//! read, and only turned into a candle `Device` by commands that compute. Asking for
//! a backend this binary was not built with fails with the cargo feature to build with.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::{Error, Result};

/// A requested device, as written on the command line or in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// A compiled-in GPU backend when one is usable, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The NVIDIA GPU with this ordinal.
    Cuda(usize),
    /// The default Apple GPU.
    Metal,
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let invalid = || {
            Error::Invalid(format!(
                "unknown device `{text}`: expected auto, cpu, cuda, cuda:N or metal"
            ))
        };
        match text {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            "metal" => Ok(DeviceSpec::Metal),
            _ => {
                let ordinal = text.strip_prefix("cuda:").ok_or_else(invalid)?;
                ordinal.parse().map(DeviceSpec::Cuda).map_err(|_| invalid())
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
            DeviceSpec::Metal => f.write_str("metal"),
        }
    }
}

/// The GPU backends compiled into this binary, by cargo feature name.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut backends = vec!["cpu"];
    if cfg!(feature = "cuda") {
        backends.push("cuda");
    }
    if cfg!(feature = "metal") {
        backends.push("metal");
    }
    backends
}

fn not_compiled(spec: DeviceSpec, feature: &str) -> Error {
    Error::Invalid(format!(
        "--device {spec}: this nlp was built without the `{feature}` feature; \
         rebuild with `cargo build --release --features {feature}`"
    ))
}

impl DeviceSpec {
    /// Opens the device. `Auto` never fails: it falls back to the CPU.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Auto => {
                if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                    if let Ok(device) = Device::new_cuda(0) {
                        return Ok(device);
                    }
                }
                if cfg!(feature = "metal") && candle_core::utils::metal_is_available() {
                    if let Ok(device) = Device::new_metal(0) {
                        return Ok(device);
                    }
                }
                Ok(Device::Cpu)
            }
            DeviceSpec::Cuda(ordinal) => {
                if !cfg!(feature = "cuda") {
                    return Err(not_compiled(self, "cuda"));
                }
                Device::new_cuda(ordinal)
                    .map_err(|err| Error::Invalid(format!("--device {self}: {err}")))
            }
            DeviceSpec::Metal => {
                if !cfg!(feature = "metal") {
                    return Err(not_compiled(self, "metal"));
                }
                Device::new_metal(0)
                    .map_err(|err| Error::Invalid(format!("--device {self}: {err}")))
            }
        }
    }
}

/// A short human name for a resolved device.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => format!("cuda ({:?})", device.location()),
        Device::Metal(_) => format!("metal ({:?})", device.location()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_documented_form() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!("metal".parse::<DeviceSpec>().unwrap(), DeviceSpec::Metal);
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", ""] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn display_round_trips() {
        for spec in [DeviceSpec::Auto, DeviceSpec::Cpu, DeviceSpec::Cuda(2), DeviceSpec::Metal] {
            assert_eq!(spec.to_string().parse::<DeviceSpec>().unwrap(), spec);
        }
    }

    #[test]
    fn auto_and_cpu_always_resolve() {
        assert!(DeviceSpec::Cpu.resolve().unwrap().is_cpu());
        DeviceSpec::Auto.resolve().unwrap();
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_names_it() {
        let err = DeviceSpec::Cuda(0).resolve().unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }

    #[cfg(not(feature = "metal"))]
    #[test]
    fn metal_without_the_feature_names_it() {
        let err = DeviceSpec::Metal.resolve().unwrap_err().to_string();
        assert!(err.contains("--features metal"), "{err}");
    }
}
