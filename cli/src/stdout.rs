//! Printing to stdout for commands whose output may be piped (`moe cluster status | head`):
//! a closed pipe means the reader has what it wanted, so the command ends quietly with
//! exit 0 instead of panicking as `println!` does.

use std::io::Write;

/// Writes one line to stdout; on a closed pipe exits 0 at once.
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{args}").and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("moe: writing to stdout: {e}");
            std::process::exit(1);
        }
    }
}

/// `println!` that exits quietly when stdout's pipe is closed.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => { $crate::stdout::line(format_args!($($t)*)) };
}
