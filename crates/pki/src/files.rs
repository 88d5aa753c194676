//! Credential files: private ones are created with mode 0600 from the first byte.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::path::Path;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::{PkiError, Result};

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a new private file (a key, a token) that exists only with mode 0600: it is
/// created with that mode (no window at the default permissions) and never overwritten.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    write_new(path, bytes, 0o600)
}

pub(crate) fn write_public(path: &Path, bytes: &[u8]) -> Result<()> {
    write_new(path, bytes, 0o644)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut o = OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = o.open(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(())
}

/// Creates the credentials directory with mode 0700, or narrows an existing one to it
/// (it holds keys: no one else may list or enter it).
pub(crate) fn create_dir_private(dir: &Path) -> Result<()> {
    let mut b = DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        b.mode(0o700);
        b.create(dir).map_err(io_err(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
    }
    #[cfg(not(unix))]
    b.create(dir).map_err(io_err(dir))
}

/// Credential files are small; a larger one is not what it claims to be.
const FILE_BYTES_MAX: u64 = 1 << 20;

pub(crate) fn read(path: &Path) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path).map_err(io_err(path))?.len();
    if len > FILE_BYTES_MAX {
        return Err(PkiError::BadFile {
            path: path.to_path_buf(),
            message: format!("{len} bytes; a credential file is at most {FILE_BYTES_MAX}"),
        });
    }
    std::fs::read(path).map_err(io_err(path))
}

pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    read_certs_from(&read(path)?, path)
}

pub(crate) fn read_certs_from(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| PkiError::BadFile {
            path: path.to_path_buf(),
            message: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(PkiError::BadFile {
            path: path.to_path_buf(),
            message: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| PkiError::BadFile {
            path: path.to_path_buf(),
            message: format!("bad PEM: {e}"),
        })?
        .ok_or_else(|| PkiError::BadFile {
            path: path.to_path_buf(),
            message: "no PRIVATE KEY block".into(),
        })
}
