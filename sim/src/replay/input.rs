//! The log files: rotated ones read oldest first (`mail.log.3.gz`, `mail.log.2.gz`,
//! `mail.log.1`, `mail.log`; or `mail.log-20261201.gz` before `mail.log-20261208`), gzipped ones
//! (by their magic, whatever their name) through flate2, every line handed to a [`LogReader`].
//! Lines that are not UTF-8 are read lossily; nothing in a file is fatal.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use super::LogReader;
use super::assemble::{Loc, LoggedSession};

/// Where a file stands in its rotation: older first.
fn rotation_rank(path: &Path) -> (String, i64, String) {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let name = name.strip_suffix(".gz").unwrap_or(&name).to_string();
    if let Some((base, n)) = name.rsplit_once('.')
        && !n.is_empty()
        && n.len() <= 4
        && n.bytes().all(|c| c.is_ascii_digit())
    {
        return (base.to_string(), -n.parse::<i64>().unwrap_or(0), String::new());
    }
    if let Some((base, date)) = name.rsplit_once('-')
        && date.len() >= 8
        && date.bytes().all(|c| c.is_ascii_digit())
    {
        return (base.to_string(), 0, date.to_string());
    }
    // The live file comes after its rotations.
    (name, 1, String::new())
}

/// The files in the order their lines were written.
pub fn order(mut paths: Vec<PathBuf>) -> Vec<PathBuf> {
    paths.sort_by_cached_key(|p| {
        let parent = p.parent().map(Path::to_path_buf).unwrap_or_default();
        (parent, rotation_rank(p))
    });
    paths
}

/// A file's lines, gunzipped if it is gzip.
pub fn open(path: &Path) -> io::Result<Box<dyn BufRead + Send>> {
    let mut f = BufReader::with_capacity(1 << 16, File::open(path)?);
    let gz = f.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    Ok(if gz {
        Box::new(BufReader::with_capacity(1 << 16, flate2::bufread::MultiGzDecoder::new(f)))
    } else {
        Box::new(f)
    })
}

/// Reads every file into `reader`, handing each session to `out` as it is ready.
pub fn read_all(
    files: &[PathBuf],
    reader: &mut LogReader,
    mut out: impl FnMut(LoggedSession) -> bool,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    for (i, path) in files.iter().enumerate() {
        let mut r = open(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let file = u16::try_from(i).unwrap_or(u16::MAX);
        let mut n: u32 = 0;
        loop {
            buf.clear();
            let got = r
                .read_until(b'\n', &mut buf)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            if got == 0 {
                break;
            }
            n = n.saturating_add(1);
            match std::str::from_utf8(&buf) {
                Ok(s) => reader.line(s, Loc { file, line: n }),
                Err(_) => reader.line(&String::from_utf8_lossy(&buf), Loc { file, line: n }),
            }
            while let Some(s) = reader.next_session() {
                if !out(s) {
                    return Ok(());
                }
            }
        }
    }
    reader.finish();
    while let Some(s) = reader.next_session() {
        if !out(s) {
            break;
        }
    }
    Ok(())
}

/// The year of a file's last change (the default `--year` of year-less stamps).
pub fn mtime_year(path: &Path) -> Option<i64> {
    let m = std::fs::metadata(path).ok()?.modified().ok()?;
    let secs = m.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as i64;
    Some(super::time::civil(secs).0)
}

/// Reads a whole small file (tests).
pub fn read_to_string(path: &Path) -> io::Result<String> {
    let mut s = String::new();
    open(path)?.read_to_string(&mut s)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_files_oldest_first() {
        let p = |v: &[&str]| v.iter().map(PathBuf::from).collect::<Vec<_>>();
        assert_eq!(
            order(p(&["/l/mail.log", "/l/mail.log.1", "/l/mail.log.10.gz", "/l/mail.log.2.gz"])),
            p(&["/l/mail.log.10.gz", "/l/mail.log.2.gz", "/l/mail.log.1", "/l/mail.log"])
        );
        assert_eq!(
            order(p(&["/l/maillog", "/l/maillog-20261208", "/l/maillog-20261201.gz"])),
            p(&["/l/maillog-20261201.gz", "/l/maillog-20261208", "/l/maillog"])
        );
    }

    #[test]
    fn gzip_by_magic() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mail.log.1");
        let mut gz = flate2::write::GzEncoder::new(File::create(&path).unwrap(), flate2::Compression::fast());
        gz.write_all(b"line one\nline two\n").unwrap();
        gz.finish().unwrap();
        assert_eq!(read_to_string(&path).unwrap(), "line one\nline two\n");
    }
}
