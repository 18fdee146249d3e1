//! The benches' child `dvmm run`: this same binary, started with its console on a pipe.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;

/// `dvmm run --nodes N --vcpus V` of this executable, to which the caller adds the rest.
pub fn command(nodes: usize, vcpus: usize) -> Result<Command, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find dvmm itself: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args(["run", "--nodes", &nodes.to_string()])
        .args(["--vcpus", &vcpus.to_string()]);
    Ok(cmd)
}

/// Starts `cmd` with no input, the console (stdout) on a pipe and, with `keep_stderr`,
/// its stderr read whole by a thread (returned), else discarded.
pub fn spawn(
    mut cmd: Command,
    keep_stderr: bool,
) -> Result<(Child, Option<JoinHandle<String>>), String> {
    let err = if keep_stderr {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start dvmm run: {e}"))?;
    let reader = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = e.read_to_string(&mut s);
            s
        })
    });
    Ok((child, reader))
}

/// What the stderr thread read (empty if there was none or it failed).
pub fn stderr_of(reader: Option<JoinHandle<String>>) -> String {
    reader
        .map(|r| r.join().unwrap_or_default())
        .unwrap_or_default()
}
