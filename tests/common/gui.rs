//! Driving the window in-process with egui_kittest.

use std::time::{Duration, Instant};

use egui_kittest::Harness;
use qlora_studio::gui::StudioApp;

/// Step the window until `done` holds (a worker's result arrived); fails after two minutes
/// naming `what` it waited for.
pub fn wait_until(harness: &mut Harness<'_, StudioApp>, what: &str, done: impl Fn(&StudioApp) -> bool) {
    let start = Instant::now();
    while !done(harness.state()) {
        assert!(start.elapsed() < Duration::from_secs(120), "timed out waiting for {what}");
        harness.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    harness.step();
}
