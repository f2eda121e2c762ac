//! Training in a child process, so that the window survives whatever the run does: a failed
//! allocation that aborts, or the kernel's OOM killer, which picks the process holding the most
//! memory — the run, not the window.
//!
//! The child is this same binary (`qlora-studio train-worker`, hidden). The first line on its
//! stdin is the run (the RunConfig as TOML, and the checkpoint to resume from); then one
//! `Command` per line. It answers with one `TrainEvent` per line on stdout, as JSON. The parent
//! turns them back into the channels `train::spawn` gives, so the GUI sees no difference.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};

use super::config::RunConfig;
use super::events::{Command, TrainEvent};
use crate::{Error, Result};

/// The name of the hidden subcommand the child runs.
pub const SUBCOMMAND: &str = "train-worker";

static IN_CHILD_PROCESS: AtomicBool = AtomicBool::new(false);

/// Make `spawn_run` train in a child process (the GUI binary does; tests and the CLI train on
/// a thread of their own process).
pub fn train_in_child_process(on: bool) {
    IN_CHILD_PROCESS.store(on, Ordering::Relaxed);
}

/// Whether `spawn_run` starts a child process.
pub fn trains_in_child_process() -> bool {
    IN_CHILD_PROCESS.load(Ordering::Relaxed)
}

/// The first line the child reads.
#[derive(Debug, Serialize, Deserialize)]
struct Job {
    config: String,
    resume_from: Option<PathBuf>,
}

/// Start a run: in a child process when `train_in_child_process(true)` was called (falling
/// back to a thread, with a notice, when the child cannot be started), else on a thread.
pub fn spawn_run(
    config: RunConfig,
    resume_from: Option<PathBuf>,
) -> (Receiver<TrainEvent>, Sender<Command>, JoinHandle<()>) {
    if !trains_in_child_process() {
        return super::spawn(config, resume_from);
    }
    match spawn_child(&config, resume_from.clone()) {
        Ok(channels) => channels,
        Err(e) => {
            let (events, commands, handle) = super::spawn(config, resume_from);
            let notice = TrainEvent::Notice(format!(
                "training in the window's own process: the training process could not be started ({e})"
            ));
            // put the notice first: a channel of our own in front of the trainer's
            let (tx, rx) = crossbeam_channel::unbounded();
            let _ = tx.send(notice);
            let pump = std::thread::spawn(move || {
                for event in events.iter() {
                    let _ = tx.send(event);
                }
                let _ = handle.join();
            });
            (rx, commands, pump)
        }
    }
}

fn spawn_child(
    config: &RunConfig,
    resume_from: Option<PathBuf>,
) -> Result<(Receiver<TrainEvent>, Sender<Command>, JoinHandle<()>)> {
    let exe = std::env::current_exe().map_err(|e| Error::Invalid(format!("where is this program? {e}")))?;
    let mut child = Process::new(&exe)
        .arg(SUBCOMMAND)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Error::io(&exe, e))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let stdout = child.stdout.take().expect("stdout is piped");
    let job = Job { config: config.to_toml(), resume_from };
    let line = serde_json::to_string(&job).map_err(|e| Error::Invalid(e.to_string()))?;
    writeln!(stdin, "{line}").map_err(|e| Error::io(&exe, e))?;

    let (event_tx, event_rx) = crossbeam_channel::unbounded();
    let (command_tx, command_rx) = crossbeam_channel::unbounded::<Command>();
    std::thread::spawn(move || forward_commands(command_rx, stdin));
    let pump = std::thread::Builder::new()
        .name("trainer process".into())
        .spawn(move || pump_events(child, stdout, &event_tx))
        .map_err(|e| Error::Invalid(format!("cannot start a thread: {e}")))?;
    Ok((event_rx, command_tx, pump))
}

fn forward_commands(commands: Receiver<Command>, mut stdin: ChildStdin) {
    for command in commands.iter() {
        let Ok(line) = serde_json::to_string(&command) else { continue };
        if writeln!(stdin, "{line}").and_then(|_| stdin.flush()).is_err() {
            return;
        }
    }
}

/// The child's events into the channel; when its output ends without a last event, a Failed
/// that says how the process ended.
fn pump_events(mut child: Child, stdout: std::process::ChildStdout, events: &Sender<TrainEvent>) {
    let mut ended = false;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<TrainEvent>(&line) {
            Ok(event) => {
                ended |= matches!(event, TrainEvent::Finished(_) | TrainEvent::Failed { .. });
                let _ = events.send(event);
            }
            // a stray line on stdout (a library's print) is not an event
            Err(_) => eprintln!("{line}"),
        }
    }
    let status = child.wait();
    if !ended {
        let _ = events.send(TrainEvent::Failed { message: ended_without_a_word(status) });
    }
}

fn ended_without_a_word(status: std::io::Result<std::process::ExitStatus>) -> String {
    let how = match status {
        Ok(s) => {
            #[cfg(unix)]
            if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&s) {
                let why = match signal {
                    9 => ": killed, most often by the system when memory runs out",
                    6 => ": aborted, most often on a failed allocation (out of memory)",
                    _ => "",
                };
                return format!(
                    "the training process ended on signal {signal}{why}; the window is fine and checkpoints already \
                     written are kept (resume from the latest, with a smaller batch or sequence if memory ran out)"
                );
            }
            format!("with {s}")
        }
        Err(e) => format!("and could not be waited for ({e})"),
    };
    format!("the training process ended {how} before its run did; checkpoints already written are kept")
}

/// The child's side: read the job, train on a thread, write the events; stdin's commands go
/// to the trainer. When the window goes away (stdin closes, or stdout can no longer be
/// written), the run stops at the end of its step and saves a checkpoint.
pub fn serve() -> Result<()> {
    let stdin = std::io::stdin();
    let mut first = String::new();
    stdin.lock().read_line(&mut first).map_err(|e| Error::Invalid(format!("reading the job: {e}")))?;
    let job: Job = serde_json::from_str(&first).map_err(|e| Error::Invalid(format!("the job line: {e}")))?;
    let config = RunConfig::from_toml_str(&job.config, "the run sent by the window")?;
    let (events, commands, handle) = super::spawn(config, job.resume_from);
    let to_trainer = commands.clone();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if let Ok(command) = serde_json::from_str::<Command>(&line) {
                let _ = to_trainer.send(command);
            }
        }
        let _ = to_trainer.send(Command::Stop);
    });
    let mut stdout = std::io::stdout().lock();
    for event in events.iter() {
        let line = serde_json::to_string(&event).map_err(|e| Error::Invalid(e.to_string()))?;
        if writeln!(stdout, "{line}").and_then(|_| stdout.flush()).is_err() {
            let _ = commands.send(Command::Stop);
        }
    }
    let _ = handle.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_commands_survive_the_pipe() {
        let events = [
            TrainEvent::Loading { stage: "loading".into(), fraction: 0.5 },
            TrainEvent::Notice("a note".into()),
            TrainEvent::Eval { step: 3, loss: 1.25 },
            TrainEvent::CheckpointSaved { step: 4, path: "runs/a/checkpoint-000004".into() },
            TrainEvent::Failed { message: "no".into() },
        ];
        for e in events {
            let back: TrainEvent = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
            assert_eq!(back, e);
        }
        for c in [Command::Pause, Command::Resume, Command::Stop, Command::SaveNow] {
            assert_eq!(serde_json::from_str::<Command>(&serde_json::to_string(&c).unwrap()).unwrap(), c);
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_killed_process_is_explained() {
        use std::os::unix::process::ExitStatusExt;
        let text = ended_without_a_word(Ok(std::process::ExitStatus::from_raw(9)));
        assert!(text.contains("signal 9") && text.contains("memory"), "{text}");
    }
}
