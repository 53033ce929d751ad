//! The systemd host path: each machine is a transient unit started by systemd-run and
//! registered with machined, so limits apply and `machinectl list` shows it.

use super::{
    describe_running, first_child, launch_command, unit_name, wait_until, Host, Machine, MachineSpec, Save, SAFE_PATH,
};
use crate::error::{Context, Error, Result};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

pub struct SystemdHost;

/// The device access of systemd-nspawn@.service (252 and 257): `closed` (the standard pseudo
/// devices), the tun device and pseudo terminals. Its loop and device-mapper entries are left
/// out: they serve nspawn's --image=, which job machines do not use, and a job must not get them.
const DEVICE_POLICY: [&str; 3] = ["DevicePolicy=closed", "DeviceAllow=/dev/net/tun rwm", "DeviceAllow=char-pts rw"];

/// What a privileged image's machine gets on top: loop devices, the reason to make an image
/// privileged, which a plain host (no device filter) does not refuse either. `m` because the
/// machine's /dev has no loop nodes: the job makes them. block-blkext (in systemd-nspawn@.service
/// for partitioned loop devices) stays out: its major also numbers the host's NVMe partitions.
const PRIVILEGED_DEVICES: [&str; 2] = ["DeviceAllow=/dev/loop-control rwm", "DeviceAllow=block-loop rwm"];

/// Runs a systemd tool with a clean environment, returning stdout; a failure carries its stderr.
fn systemctl_like(program: &str, args: &[String]) -> Result<String> {
    let mut command = Command::new(program);
    // A stage killed while systemd-run waits must not have it create the unit later, after
    // the cleanup that stops the recorded unit has looked: it dies with the stage.
    crate::signals::terminate_with_parent(&mut command);
    let output = command
        .args(args)
        .env_clear()
        .env("PATH", SAFE_PATH)
        .stdin(Stdio::null())
        // Out of the stage's process group: a SIGTERM from gitlab-runner must not kill
        // systemd-run halfway through a boot (stopping a booting machine leaks its copy);
        // prepare finishes the start and then stops the machine cleanly.
        .process_group(0)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(Error::new(format!(
            "{program} {} failed ({}): {}",
            args.first().map(String::as_str).unwrap_or(""),
            output.status,
            stderr.trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn unit_property(unit: &str, property: &str) -> Result<String> {
    systemctl_like("systemctl", &["show".into(), format!("--property={property}"), "--value".into(), unit.into()])
}

impl Host for SystemdHost {
    fn start(&self, spec: &MachineSpec, machine: &mut Machine, save: &mut Save) -> Result<()> {
        let unit = unit_name(&spec.machine);
        // Write-ahead: a cleanup after this stage is killed stops the unit, whatever became of it.
        machine.unit = Some(unit.clone());
        save(machine)?;
        let mut args = vec![
            "--quiet".to_owned(),
            format!("--unit={unit}"),
            "--collect".to_owned(),
            "--service-type=notify".to_owned(),
            "--property=Slice=machine.slice".to_owned(),
            // The machine's systemd manages its own cgroup subtree; a mixed kill sends SIGTERM
            // to nspawn only, which powers the machine off (its --kill-signal).
            "--property=Delegate=yes".to_owned(),
            "--property=KillMode=mixed".to_owned(),
            format!("--property=TimeoutStartSec={}", spec.ready_timeout.as_secs().max(1)),
            format!("--property=TimeoutStopSec={}", spec.stop_timeout.as_secs().max(1)),
        ];
        args.extend(DEVICE_POLICY.iter().map(|p| format!("--property={p}")));
        if spec.uid_base.is_none() {
            load_loop_driver();
            args.extend(PRIVILEGED_DEVICES.iter().map(|p| format!("--property={p}")));
        }
        args.extend(spec.properties.iter().map(|p| format!("--property={p}")));
        // systemd places the unit in its cgroup: the wrapper only mounts the idmapped root.
        let (program, command) = launch_command(spec, true, Vec::new(), false)?;
        args.push("--".to_owned());
        args.push(program.display().to_string());
        args.extend(command);
        // systemd-run returns once the unit is started, i.e. after READY=1 (Type=notify).
        if let Err(e) = systemctl_like("systemd-run", &args) {
            let _ = stop_unit(&unit);
            return Err(e.context(format!("starting machine {}", spec.machine)));
        }
        let started = (|| {
            let nspawn_pid: i32 = unit_property(&unit, "MainPID")?
                .parse()
                .map_err(|_| Error::new(format!("unit {unit} has no main process")))?;
            let leader_pid = first_child(nspawn_pid)
                .ok_or_else(|| Error::new(format!("machine {} has no init process", spec.machine)))?;
            let mut running = describe_running(nspawn_pid, leader_pid, spec)?;
            // Looked up once here rather than by every run stage (a systemctl call each).
            running.cgroup = unit_property(&unit, "ControlGroup").ok().filter(|c| !c.is_empty());
            Ok(running)
        })();
        match started {
            Ok(running) => {
                machine.running = Some(running);
                Ok(())
            }
            Err(e) => {
                let _ = stop_unit(&unit);
                Err(e)
            }
        }
    }

    fn stop(&self, machine: &Machine, timeout: Duration) -> Result<()> {
        let unit = machine.unit.clone().unwrap_or_else(|| unit_name(&machine.name));
        if machine.running.is_none() {
            kill_booting_init(&unit);
        }
        stop_unit(&unit)?;
        let Some(running) = &machine.running else { return Ok(()) };
        if wait_until(timeout, || !running.leader_alive() && !running.nspawn_alive()) {
            Ok(())
        } else {
            Err(Error::new(format!("machine {} is still running after stopping {unit}", machine.name)))
        }
    }
}

/// A machine never recorded up (its prepare was killed while it booted) may still be booting:
/// its init, nspawn's child, may not have its signal handlers yet and would ignore the poweroff
/// until systemd's SIGKILL, which leaves nspawn no chance to remove its ephemeral copy. Killing
/// the init ends the machine at once, and nspawn exits cleanly.
fn kill_booting_init(unit: &str) {
    let main_pid = unit_property(unit, "MainPID").ok().and_then(|pid| pid.parse::<i32>().ok()).filter(|pid| *pid > 0);
    if let Some(init) = main_pid.and_then(first_child) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(init), nix::sys::signal::Signal::SIGKILL);
    }
}

/// systemd resolves `block-loop` through /proc/devices when the unit starts and drops the rule if
/// no loop driver is registered yet (Debian 13 does not load it at boot). Opening the control
/// device makes the kernel load the driver, as `modprobe loop` does in systemd-nspawn@.service.
/// Without it the job still runs, only without loop devices: a warning, not a failure.
fn load_loop_driver() {
    if let Err(e) = std::fs::File::open("/dev/loop-control") {
        log::warn!("/dev/loop-control: {e}: this privileged job gets no loop devices");
    }
}

/// Stops the unit (systemd escalates to SIGKILL after the unit's stop timeout); fine if absent.
fn stop_unit(unit: &str) -> Result<()> {
    let loaded = unit_property(unit, "LoadState").unwrap_or_default();
    if loaded != "loaded" {
        return Ok(());
    }
    systemctl_like("systemctl", &["stop".into(), unit.into()])?;
    // A failed transient unit stays listed until reset; --collect handles most cases.
    let _ = systemctl_like("systemctl", &["reset-failed".into(), unit.into()]);
    Ok(())
}
