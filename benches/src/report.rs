//! Where results go: a JSON file per benchmark (with the exact command, the machine, the date and
//! the peers' versions) and its SVG plots, in the `--out` directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::sys::{self, Machine};

#[derive(Serialize)]
pub struct Run<'a, T: Serialize> {
    pub bench: &'a str,
    /// The command line that produced it.
    pub command: String,
    pub machine: Machine,
    /// Versions of what ran: the peers, and whether the node was a release build.
    pub versions: Vec<(String, String)>,
    pub result: &'a T,
}

/// The command line of this process, as typed.
pub fn command_line() -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let Some(a) = args.first_mut() {
        if let Some(name) = Path::new(a).file_name() {
            *a = name.to_string_lossy().into_owned();
        }
    }
    args.join(" ")
}

pub struct Out {
    pub dir: Option<PathBuf>,
    pub machine: Machine,
}

impl Out {
    pub fn new(dir: Option<PathBuf>) -> Result<Out> {
        if let Some(d) = &dir {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        Ok(Out {
            dir,
            machine: sys::machine(),
        })
    }

    pub fn json<T: Serialize>(&self, bench: &str, versions: Vec<(String, String)>, result: &T) -> Result<()> {
        let Some(d) = &self.dir else { return Ok(()) };
        let run = Run {
            bench,
            command: command_line(),
            machine: self.machine.clone(),
            versions,
            result,
        };
        let p = d.join(format!("{bench}.json"));
        std::fs::write(&p, serde_json::to_string_pretty(&run)?)?;
        eprintln!("wrote {}", p.display());
        Ok(())
    }

    pub fn svg(&self, file: &str, svg: String) -> Result<()> {
        let Some(d) = &self.dir else { return Ok(()) };
        let p = d.join(file);
        std::fs::write(&p, svg)?;
        eprintln!("wrote {}", p.display());
        Ok(())
    }
}

/// `a / b` as a ratio string, or "—" when it means nothing.
pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() && a > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "—".into()
    }
}
