//! A message as it arrives: [`MessageFile`], the file in a spool's `tmp/` that the driver
//! writes a message into while it is received (so that no message is ever held whole in
//! memory), and [`Content`], how scanners and downstreams read it back in chunks.
//!
//! It owns the file's lifetime: a file that is not committed (renamed into place by its
//! downstream) is removed when it is dropped, so no error path — a failed write, a message too
//! big, a dropped connection, a failed handoff — leaves a `tmp/` file behind. Files are created
//! 0600. It must not decide anything about the message, nor know where it goes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A message being received (or received), written to its own file as it arrives. The file
/// may start with a head (trace headers the downstream writes before the content); the
/// message's content follows it.
///
/// Removed from disk when dropped, unless [`MessageFile::commit`]ted.
#[derive(Debug)]
pub struct MessageFile {
    path: PathBuf,
    id: String,
    file: File,
    /// Octets before the content.
    head: u64,
    /// Octets of content written.
    len: u64,
    committed: bool,
}

impl MessageFile {
    /// Creates `dir/id` (which must not exist), mode 0600, and writes `head` into it.
    pub fn create(dir: &Path, id: &str, head: &[u8]) -> io::Result<MessageFile> {
        let path = dir.join(id);
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path)?;
        let mut message = MessageFile { path, id: id.to_string(), file, head: 0, len: 0, committed: false };
        message.file.write_all(head)?; // on error, dropping `message` removes the file
        message.head = head.len() as u64;
        Ok(message)
    }

    /// A message file in `dir` holding `content` (tests, tools).
    pub fn with_content(dir: &Path, id: &str, content: &[u8]) -> io::Result<MessageFile> {
        let mut message = MessageFile::create(dir, id, b"")?;
        message.append(content)?;
        Ok(message)
    }

    /// Appends content. Written straight to the file (the page cache): the driver hands over
    /// what one read of the socket brought, so nothing is buffered here.
    pub fn append(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.file.write_all(chunk)?;
        self.len += chunk.len() as u64;
        Ok(())
    }

    /// The name of the file, unique in its directory (the downstream's queue id).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Octets of content written (without the head).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// No content written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A reader of the content (without the head), from its start.
    pub fn content(&self) -> io::Result<Content> {
        Ok(Content { file: self.file.try_clone()?, pos: self.head, end: self.head + self.len })
    }

    /// A reader of the whole file: the head, then the content.
    pub fn whole(&self) -> io::Result<Content> {
        Ok(Content { file: self.file.try_clone()?, pos: 0, end: self.head + self.len })
    }

    /// Makes the file durable (fsync) and renames it to `to`; from then on it is the
    /// downstream's and is no longer removed. The rename's directory must be fsync'd by the
    /// caller for the rename itself to be durable. Blocking.
    pub fn commit(mut self, to: &Path) -> io::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.path, to)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for MessageFile {
    fn drop(&mut self) {
        if !self.committed
            && let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove an unfinished message file");
        }
    }
}

/// Reads part of a [`MessageFile`] in chunks, at its own position (positioned reads on a
/// duplicate descriptor, so readers never disturb each other nor the writer). Blocking reads
/// of a file just written, usually from the page cache.
#[derive(Debug)]
pub struct Content {
    file: File,
    pos: u64,
    end: u64,
}

impl Content {
    /// Octets left to read.
    pub fn remaining(&self) -> u64 {
        self.end - self.pos
    }
}

impl Read for Content {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(usize::try_from(self.remaining()).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "message file shorter than written"));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Free octets for an unprivileged writer on the filesystem holding `path` (statvfs
/// `f_bavail` × `f_frsize`).
pub fn available_space(path: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_and_whole_read_back_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MessageFile::create(dir.path(), "m1", b"Head: x\r\n").unwrap();
        m.append(b"Subject: a\r\n\r\n").unwrap();
        m.append(b"body\r\n").unwrap();
        assert_eq!(m.len(), 20);
        let mut content = Vec::new();
        m.content().unwrap().read_to_end(&mut content).unwrap();
        assert_eq!(content, b"Subject: a\r\n\r\nbody\r\n");
        let mut whole = Vec::new();
        let mut r = m.whole().unwrap();
        assert_eq!(r.remaining(), 29);
        // Small reads, as a scanner's chunks.
        let mut buf = [0u8; 4];
        loop {
            let n = r.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            whole.extend_from_slice(&buf[..n]);
        }
        assert_eq!(whole, b"Head: x\r\nSubject: a\r\n\r\nbody\r\n");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(m.path()).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn dropped_unless_committed() {
        let dir = tempfile::tempdir().unwrap();
        let m = MessageFile::with_content(dir.path(), "gone", b"x\r\n").unwrap();
        let path = m.path().to_path_buf();
        assert!(path.is_file());
        drop(m);
        assert!(!path.exists(), "an uncommitted message file is removed");
        let m = MessageFile::with_content(dir.path(), "kept", b"y\r\n").unwrap();
        let to = dir.path().join("kept.final");
        m.commit(&to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"y\r\n");
        assert!(!dir.path().join("kept").exists());
        // An existing name is refused, not overwritten.
        std::fs::write(dir.path().join("taken"), b"z").unwrap();
        assert!(MessageFile::create(dir.path(), "taken", b"").is_err());
        assert_eq!(std::fs::read(dir.path().join("taken")).unwrap(), b"z");
        assert!(available_space(dir.path()).unwrap() > 0);
        assert!(available_space(&dir.path().join("missing")).is_err());
    }
}
