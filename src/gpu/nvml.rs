//! GPU facts from NVML (`nvml-wrapper`, which opens the library with
//! libloading at run time, so the binary starts on nodes without NVIDIA
//! drivers).
//!
//! The calls are kept apart from the mapping: [`RawDevice`] holds NVML's
//! answers as NVML gives them, and [`map`] turns them into [`GpuFacts`], so
//! the mapping is unit-tested without a GPU.

use std::ffi::OsStr;

use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

use super::{FactSource, GpuDevice, GpuError, GpuFacts, Inventory};

/// The library every NVIDIA driver install ships (the unversioned
/// `libnvidia-ml.so` that nvml-wrapper asks for by default is only in the
/// development packages).
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// NVML's `NVML_DEVICE_MIG_ENABLE` (nvml.h).
const MIG_ENABLE: u32 = 1;

pub struct NvmlInventory {
    /// A library name (looked up by the dynamic loader) or a path.
    pub library: String,
}

/// One device's answers, as NVML returns them. `None` where the call said
/// `NVML_ERROR_NOT_SUPPORTED` (MIG on a GPU without MIG, say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawDevice {
    /// `nvmlDeviceGetName`.
    pub name: String,
    /// `nvmlDeviceGetMemoryInfo`: `nvmlMemory_t.total`, bytes.
    pub memory_total: u64,
    /// `nvmlDeviceGetCudaComputeCapability`: major, minor.
    pub compute_capability: Option<(i32, i32)>,
    /// `nvmlDeviceGetMigMode`: the current mode.
    pub mig_current: Option<u32>,
    /// `nvmlDeviceGetUUID`.
    pub uuid: Option<String>,
}

/// The system's answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSystem {
    /// `nvmlSystemGetDriverVersion`.
    pub driver_version: Option<String>,
    /// `nvmlSystemGetCudaDriverVersion_v2`: `1000 * major + 10 * minor`.
    pub cuda_driver_version: Option<i32>,
    pub devices: Vec<RawDevice>,
}

/// NVML's answers as facts.
pub fn map(raw: RawSystem) -> GpuFacts {
    GpuFacts {
        source: FactSource::Nvml,
        devices: raw
            .devices
            .into_iter()
            .enumerate()
            .map(|(i, d)| GpuDevice {
                index: i as u32,
                product: d.name,
                memory_bytes: d.memory_total,
                compute_capability: d.compute_capability.map(|(a, b)| format!("{a}.{b}")),
                mig_enabled: d.mig_current.map(|m| m == MIG_ENABLE),
                uuid: d.uuid,
            })
            .collect(),
        driver_version: raw.driver_version,
        cuda_version: raw.cuda_driver_version.map(cuda_version),
        note: None,
    }
}

/// `12040` -> `12.4` (NVML's `NVML_CUDA_DRIVER_VERSION_MAJOR/MINOR`).
pub fn cuda_version(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

fn optional<T>(call: &'static str, r: Result<T, NvmlError>) -> Result<Option<T>, GpuError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(NvmlError::NotSupported) => Ok(None),
        Err(e) => Err(GpuError::Nvml {
            call,
            reason: e.to_string(),
        }),
    }
}

fn required<T>(call: &'static str, r: Result<T, NvmlError>) -> Result<T, GpuError> {
    r.map_err(|e| GpuError::Nvml {
        call,
        reason: e.to_string(),
    })
}

impl NvmlInventory {
    fn read(&self) -> Result<RawSystem, GpuError> {
        let nvml = Nvml::builder()
            .lib_path(OsStr::new(&self.library))
            .init()
            .map_err(|e| GpuError::NvmlUnavailable {
                library: self.library.clone(),
                reason: unavailable_reason(&e),
            })?;
        let count = required("nvmlDeviceGetCount", nvml.device_count())?;
        let mut devices = Vec::with_capacity(count as usize);
        for i in 0..count {
            let dev = required("nvmlDeviceGetHandleByIndex", nvml.device_by_index(i))?;
            devices.push(RawDevice {
                name: required("nvmlDeviceGetName", dev.name())?,
                memory_total: required("nvmlDeviceGetMemoryInfo", dev.memory_info())?.total,
                compute_capability: optional(
                    "nvmlDeviceGetCudaComputeCapability",
                    dev.cuda_compute_capability(),
                )?
                .map(|c| (c.major, c.minor)),
                mig_current: optional("nvmlDeviceGetMigMode", dev.mig_mode())?.map(|m| m.current),
                uuid: optional("nvmlDeviceGetUUID", dev.uuid())?,
            });
        }
        Ok(RawSystem {
            driver_version: optional("nvmlSystemGetDriverVersion", nvml.sys_driver_version())?,
            cuda_driver_version: optional(
                "nvmlSystemGetCudaDriverVersion_v2",
                nvml.sys_cuda_driver_version(),
            )?,
            devices,
        })
    }
}

/// libloading's error names the file and the loader's message; say it
/// plainly for the common case.
fn unavailable_reason(e: &NvmlError) -> String {
    match e {
        NvmlError::LibloadingError(le) => format!("cannot load the library: {le}"),
        NvmlError::DriverNotLoaded => "the NVIDIA kernel driver is not loaded".into(),
        NvmlError::NoPermission => "no permission to talk to the NVIDIA driver".into(),
        other => other.to_string(),
    }
}

impl Inventory for NvmlInventory {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn discover(&self) -> Result<GpuFacts, GpuError> {
        self.read().map(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What NVML returns on a g5.12xlarge's first two A10Gs and on an A100
    /// with MIG on, as its documented structures hold them: `nvmlMemory_t`
    /// total in bytes, compute capability as two ints, MIG mode as
    /// `NVML_DEVICE_MIG_ENABLE` (1) or `_DISABLE` (0), the CUDA driver
    /// version as `1000 * major + 10 * minor`.
    fn raw() -> RawSystem {
        RawSystem {
            driver_version: Some("550.54.15".into()),
            cuda_driver_version: Some(12040),
            devices: vec![
                RawDevice {
                    name: "NVIDIA A10G".into(),
                    memory_total: 24_146_608_128,
                    compute_capability: Some((8, 6)),
                    mig_current: None,
                    uuid: Some("GPU-6e4f2bd5-0bc5-4e0a-b6c2-3d4e5f607182".into()),
                },
                RawDevice {
                    name: "NVIDIA A100-SXM4-40GB".into(),
                    memory_total: 42_949_672_960,
                    compute_capability: Some((8, 0)),
                    mig_current: Some(1),
                    uuid: None,
                },
                RawDevice {
                    name: "NVIDIA H100 80GB HBM3".into(),
                    memory_total: 85_520_809_984,
                    compute_capability: Some((9, 0)),
                    mig_current: Some(0),
                    uuid: None,
                },
            ],
        }
    }

    #[test]
    fn nvml_answers_map_to_facts() {
        let f = map(raw());
        assert_eq!(f.source, FactSource::Nvml);
        assert_eq!(f.driver_version.as_deref(), Some("550.54.15"));
        assert_eq!(f.cuda_version.as_deref(), Some("12.4"));
        assert_eq!(f.count(), 3);
        let [a10g, a100, h100] = &f.devices[..] else {
            panic!("three devices");
        };
        assert_eq!((a10g.index, a10g.product.as_str()), (0, "NVIDIA A10G"));
        assert_eq!(a10g.memory_bytes, 24_146_608_128);
        assert_eq!(a10g.compute_capability.as_deref(), Some("8.6"));
        assert_eq!(a10g.mig_enabled, None);
        assert_eq!(a100.mig_enabled, Some(true));
        assert_eq!(h100.mig_enabled, Some(false));
        assert_eq!(h100.index, 2);
    }

    #[test]
    fn cuda_versions() {
        assert_eq!(cuda_version(12040), "12.4");
        assert_eq!(cuda_version(11080), "11.8");
        assert_eq!(cuda_version(12000), "12.0");
    }

    /// This machine has no NVIDIA driver: opening NVML fails cleanly and
    /// says which library it looked for.
    #[test]
    fn a_missing_library_is_reported_not_fatal() {
        let inv = NvmlInventory {
            library: "/nonexistent/libnvidia-ml.so.1".into(),
        };
        match inv.discover() {
            Err(GpuError::NvmlUnavailable { library, reason }) => {
                assert_eq!(library, "/nonexistent/libnvidia-ml.so.1");
                assert!(reason.contains("cannot load"), "{reason}");
            }
            other => panic!("expected NvmlUnavailable, got {other:?}"),
        }
    }
}
