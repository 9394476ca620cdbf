//! CURVE keys for the mesh: key pairs, their files, and the broker's list of
//! allowed public keys.
//!
//! The mesh is encrypted and authenticated with ZeroMQ's CURVE mechanism
//! (CurveZMQ: Curve25519 keys, the ZeroMQ Guide's "Ironhouse" pattern). Every
//! process has a long-term key pair; a worker or semaphore knows the broker's
//! public key, and the broker knows the public keys it lets in (`zap.rs`
//! answers libzmq's questions about them).
//!
//! Keys travel in Z85, ZeroMQ's printable encoding: 40 characters for 32 bytes.
//! The files are text, one `name = "value"` per line, `#` comments:
//!
//! ```text
//! # jobz.key: SECRET, mode 0600
//! public-key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
//! secret-key = "JTKVSB%%)wK0E.X)V>+}o?pNmC{O&4W4b!Ni{Lh6"
//! # jobz.pub
//! public-key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
//! ```
//!
//! A list of allowed keys may also hold bare Z85 keys, one a line. Error
//! messages name the file and line, never a secret key's text.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::limits::{ALLOWED_KEYS_MAX, KEY_FILE_MAX_BYTES};

/// The name of the secret key file `jobz keygen` writes.
pub const SECRET_KEY_FILE: &str = "jobz.key";
/// The name of the public key file `jobz keygen` writes.
pub const PUBLIC_KEY_FILE: &str = "jobz.pub";

/// Bytes of a CURVE key.
const KEY_BYTES: usize = 32;
/// Characters of a Z85-encoded key.
pub const KEY_Z85_CHARS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{}:{line}: {reason}", path.display())]
    Line { path: PathBuf, line: usize, reason: String },
    #[error("{} already exists: jobz keygen never overwrites a key (move it away first)", path.display())]
    Exists { path: PathBuf },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot make a CURVE key pair: {0} (is libzmq built with CURVE?)")]
    Generate(zmq::Error),
    #[error("more than {ALLOWED_KEYS_MAX} allowed keys")]
    TooMany,
    #[error("{value:?} is neither a key file nor a {KEY_Z85_CHARS}-character Z85 public key")]
    NotAKey { value: String },
}

// ---------------------------------------------------------------------------
// Z85
// ---------------------------------------------------------------------------

const Z85_ALPHABET: &[u8; 85] =
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

/// Z85 (ZeroMQ RFC 32) of `data`; `None` unless its length is a multiple of 4.
pub fn z85_encode(data: &[u8]) -> Option<String> {
    if !data.len().is_multiple_of(4) {
        return None;
    }
    let mut out = String::with_capacity(data.len() / 4 * 5);
    for chunk in data.chunks_exact(4) {
        let mut value = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        let mut digits = [0u8; 5];
        for digit in digits.iter_mut().rev() {
            *digit = Z85_ALPHABET[(value % 85) as usize];
            value /= 85;
        }
        out.extend(digits.iter().map(|&d| d as char));
    }
    Some(out)
}

/// The bytes of Z85 `text`; `None` unless its length is a multiple of 5, every
/// character is in the Z85 alphabet and every group fits in 32 bits. (libzmq's
/// own decoder accepts characters outside the alphabet; this one does not.)
pub fn z85_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(5) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 5 * 4);
    for chunk in bytes.chunks_exact(5) {
        let mut value: u64 = 0;
        for &c in chunk {
            let digit = Z85_ALPHABET.iter().position(|&a| a == c)?;
            value = value * 85 + digit as u64;
        }
        let value = u32::try_from(value).ok()?;
        out.extend_from_slice(&value.to_be_bytes());
    }
    Some(out)
}

fn key_from_z85(text: &str) -> Result<[u8; KEY_BYTES], String> {
    if text.len() != KEY_Z85_CHARS {
        return Err(format!("a key is {KEY_Z85_CHARS} characters of Z85, this one has {}", text.chars().count()));
    }
    let bytes = z85_decode(text).ok_or_else(|| "not valid Z85 (ZeroMQ's printable key encoding)".to_string())?;
    bytes.try_into().map_err(|_| "not a 32-byte key".to_string())
}

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

/// A CURVE public key. It is not a secret: it is shown in logs and files.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; KEY_BYTES]);

impl PublicKey {
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> PublicKey {
        PublicKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }

    /// A public key from its 40 Z85 characters; the error says what is wrong.
    pub fn from_z85(text: &str) -> Result<PublicKey, String> {
        key_from_z85(text).map(PublicKey)
    }

    pub fn to_z85(&self) -> String {
        // 32 bytes are a multiple of 4, so encoding cannot fail.
        z85_encode(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_z85())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A CURVE secret key. It never prints: `Debug` shows only that it is there.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey([u8; KEY_BYTES]);

impl SecretKey {
    pub(crate) fn as_bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// A process's long-term key pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPair {
    pub public: PublicKey,
    secret: SecretKey,
}

impl KeyPair {
    /// A fresh key pair from libzmq (libsodium's random numbers).
    pub fn generate() -> Result<KeyPair, KeyError> {
        let pair = zmq::CurveKeyPair::new().map_err(KeyError::Generate)?;
        Ok(KeyPair { public: PublicKey(pair.public_key), secret: SecretKey(pair.secret_key) })
    }

    pub(crate) fn secret(&self) -> &SecretKey {
        &self.secret
    }

    /// The text of the secret key file (`jobz.key`); `written` goes into its comment.
    pub fn secret_file_text(&self, written: &str) -> String {
        let secret = z85_encode(&self.secret.0).unwrap_or_default();
        format!(
            "# jobz CURVE key pair, written by `jobz keygen` {written}.\n\
             # SECRET: whoever can read this file can connect as this process (or, for a\n\
             # broker, pose as it). Keep it mode 0600 and give out jobz.pub, never this file.\n\
             public-key = \"{}\"\n\
             secret-key = \"{secret}\"\n",
            self.public
        )
    }

    /// The text of the public key file (`jobz.pub`).
    pub fn public_file_text(&self, written: &str) -> String {
        format!(
            "# jobz CURVE public key, written by `jobz keygen` {written}.\n\
             # A worker's or semaphore's: copy it into the broker's --allowed-keys directory.\n\
             # A broker's: give it to workers and semaphores as --broker-key.\n\
             public-key = \"{}\"\n",
            self.public
        )
    }
}

/// The public key that belongs to `secret` (Curve25519 scalar multiplication of the base point).
fn public_of(secret: &SecretKey) -> Option<PublicKey> {
    let mut public = [0u8; KEY_BYTES];
    // SAFETY: sodium_init may be called any number of times, from any thread
    // (libsodium serializes it); crypto_scalarmult_base reads 32 bytes from
    // `secret` and writes 32 bytes to `public`, both buffers of that size that
    // outlive the call.
    let rc = unsafe {
        if libsodium_sys::sodium_init() < 0 {
            return None;
        }
        libsodium_sys::crypto_scalarmult_base(public.as_mut_ptr(), secret.0.as_ptr())
    };
    (rc == 0).then_some(PublicKey(public))
}

// ---------------------------------------------------------------------------
// Key files
// ---------------------------------------------------------------------------

/// What one key file holds.
#[derive(Default)]
struct KeyText {
    public: Option<PublicKey>,
    secret: Option<SecretKey>,
    /// Bare Z85 keys, one a line, with their line numbers (allowed-keys lists).
    bare: Vec<(usize, PublicKey)>,
}

fn parse_key_text(path: &Path, text: &str) -> Result<KeyText, KeyError> {
    let mut parsed = KeyText::default();
    let error = |line: usize, reason: String| KeyError::Line { path: path.to_path_buf(), line, reason };
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.trim();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        // A bare key first: `=` is a Z85 character, so a key may hold one.
        if let Ok(key) = PublicKey::from_z85(content) {
            parsed.bare.push((line, key));
            continue;
        }
        let Some((name, value)) = content.split_once('=') else {
            let reason = PublicKey::from_z85(content).err().unwrap_or_default();
            return Err(error(line, reason));
        };
        let name = name.trim();
        let value = value.trim();
        let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
        match name {
            "public-key" => {
                if parsed.public.is_some() {
                    return Err(error(line, "a second public-key".into()));
                }
                let key = PublicKey::from_z85(value).map_err(|reason| error(line, format!("public-key: {reason}")))?;
                parsed.public = Some(key);
            }
            "secret-key" => {
                if parsed.secret.is_some() {
                    return Err(error(line, "a second secret-key".into()));
                }
                // The reason never quotes the value: it is a secret.
                let key = key_from_z85(value).map_err(|reason| error(line, format!("secret-key: {reason}")))?;
                parsed.secret = Some(SecretKey(key));
            }
            other => {
                return Err(error(
                    line,
                    format!("unknown field {other:?} (a jobz key file has public-key and secret-key)"),
                ))
            }
        }
    }
    Ok(parsed)
}

fn read_text(path: &Path) -> Result<String, KeyError> {
    let read = |source| KeyError::Read { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut text = String::new();
    file.take(KEY_FILE_MAX_BYTES + 1).read_to_string(&mut text).map_err(read)?;
    if text.len() as u64 > KEY_FILE_MAX_BYTES {
        return Err(KeyError::Invalid {
            path: path.to_path_buf(),
            reason: format!("larger than {KEY_FILE_MAX_BYTES} bytes: not a key file"),
        });
    }
    Ok(text)
}

/// Reads a secret key file (`jobz.key`): both keys, and they must belong together.
pub fn read_key_pair(path: &Path) -> Result<KeyPair, KeyError> {
    let text = read_text(path)?;
    let parsed = parse_key_text(path, &text)?;
    let invalid = |reason: &str| KeyError::Invalid { path: path.to_path_buf(), reason: reason.to_string() };
    if let Some((line, _)) = parsed.bare.first() {
        return Err(KeyError::Line {
            path: path.to_path_buf(),
            line: *line,
            reason: "a bare key: a key pair file has `public-key = \"…\"` and `secret-key = \"…\"` lines".into(),
        });
    }
    let Some(secret) = parsed.secret else {
        return Err(invalid(
            "has no secret-key: this is a public key file; give the secret key file \
             (jobz.key, written by `jobz keygen` beside jobz.pub)",
        ));
    };
    let Some(public) = parsed.public else {
        return Err(invalid("has a secret-key but no public-key"));
    };
    match public_of(&secret) {
        Some(derived) if derived == public => {}
        Some(_) => return Err(invalid("its public-key does not belong to its secret-key")),
        None => return Err(invalid("cannot check the key pair (libsodium failed to start)")),
    }
    warn_if_readable_by_others(path);
    Ok(KeyPair { public, secret })
}

/// A secret key file that others can read is logged, not refused: container
/// secrets are often mounted 0644 inside a private filesystem.
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{mode:04o}"),
                "the secret key file can be read by other users: chmod 600 it"
            );
        }
    }
}

/// Reads one public key from a file: a `jobz.pub`, or a file with one bare Z85 key.
pub fn read_public_key(path: &Path) -> Result<PublicKey, KeyError> {
    let keys = read_public_keys(path)?;
    match keys.as_slice() {
        [(_, key)] => Ok(*key),
        [] => Err(KeyError::Invalid { path: path.to_path_buf(), reason: "holds no public key".into() }),
        _ => Err(KeyError::Invalid { path: path.to_path_buf(), reason: "holds more than one public key".into() }),
    }
}

/// Every public key of a file (a `jobz.pub`, or a list with one key a line),
/// with its line number. A file with a secret key is refused: a secret does not
/// belong where public keys are collected.
fn read_public_keys(path: &Path) -> Result<Vec<(usize, PublicKey)>, KeyError> {
    let text = read_text(path)?;
    let parsed = parse_key_text(path, &text)?;
    if parsed.secret.is_some() {
        return Err(KeyError::Invalid {
            path: path.to_path_buf(),
            reason: "holds a secret-key: give the public key file (jobz.pub) and keep jobz.key private".into(),
        });
    }
    let mut keys = parsed.bare;
    if let Some(public) = parsed.public {
        keys.insert(0, (0, public));
    }
    Ok(keys)
}

/// `--broker-key FILE_OR_Z85`: a file holding one public key, or the key itself.
pub fn public_key_from_arg(value: &str) -> Result<PublicKey, KeyError> {
    let path = Path::new(value);
    if path.exists() {
        return read_public_key(path);
    }
    PublicKey::from_z85(value.trim()).map_err(|_| KeyError::NotAKey { value: value.to_string() })
}

/// Where `jobz keygen` wrote a key pair.
#[derive(Debug, Clone)]
pub struct KeyFiles {
    pub secret: PathBuf,
    pub public: PathBuf,
}

/// Writes `pair` as `dir/jobz.key` (mode 0600) and `dir/jobz.pub` (mode 0644),
/// creating `dir` (mode 0700) if needed. Refuses if either file exists, and
/// never leaves one without the other.
pub fn write_key_pair(dir: &Path, pair: &KeyPair, written: &str) -> Result<KeyFiles, KeyError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let files = KeyFiles { secret: dir.join(SECRET_KEY_FILE), public: dir.join(PUBLIC_KEY_FILE) };
    for path in [&files.secret, &files.public] {
        // symlink_metadata: a dangling link is in the way too.
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(KeyError::Exists { path: path.clone() });
        }
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| KeyError::Write { path: dir.to_path_buf(), source })?;
    let write = |path: &Path, mode: u32, text: &str| -> Result<(), KeyError> {
        // create_new: a file that appeared since the check above is not overwritten;
        // the mode is set at creation, so the secret is never readable by others.
        let mut file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|source| {
                match source.kind() {
                    std::io::ErrorKind::AlreadyExists => KeyError::Exists { path: path.to_path_buf() },
                    _ => KeyError::Write { path: path.to_path_buf(), source },
                }
            })?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|source| KeyError::Write { path: path.to_path_buf(), source })
    };
    write(&files.secret, 0o600, &pair.secret_file_text(written))?;
    if let Err(e) = write(&files.public, 0o644, &pair.public_file_text(written)) {
        // Not one without the other: the secret we just wrote goes again.
        if let Err(remove) = std::fs::remove_file(&files.secret) {
            tracing::warn!(file = %files.secret.display(), error = %remove, "could not remove the half-written key pair");
        }
        return Err(e);
    }
    Ok(files)
}

// ---------------------------------------------------------------------------
// Allowed keys
// ---------------------------------------------------------------------------

/// The public keys the broker lets connect, each with where it came from
/// (`dir/w1.pub`, `keys.txt:3`) for the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedKeys {
    keys: BTreeMap<PublicKey, String>,
}

impl AllowedKeys {
    /// Loads every source: a directory contributes each `*.pub` file in it (not
    /// its subdirectories), a file each key in it. A source that holds no key
    /// is an error: it is surely not what was meant.
    pub fn load(sources: &[PathBuf]) -> Result<AllowedKeys, KeyError> {
        let mut allowed = AllowedKeys::default();
        for source in sources {
            let before = allowed.len();
            let meta = std::fs::metadata(source).map_err(|e| KeyError::Read { path: source.clone(), source: e })?;
            if meta.is_dir() {
                allowed.load_dir(source)?;
            } else {
                for (line, key) in read_public_keys(source)? {
                    let origin = match line {
                        0 => source.display().to_string(),
                        line => format!("{}:{line}", source.display()),
                    };
                    allowed.insert(key, origin)?;
                }
            }
            if allowed.len() == before {
                let reason = if meta.is_dir() { "holds no *.pub file" } else { "holds no public key" };
                return Err(KeyError::Invalid { path: source.clone(), reason: reason.into() });
            }
        }
        Ok(allowed)
    }

    fn load_dir(&mut self, dir: &Path) -> Result<(), KeyError> {
        let read = |source| KeyError::Read { path: dir.to_path_buf(), source };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read)? {
            let path = entry.map_err(read)?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("pub") if path.is_file() => paths.push(path),
                Some("key") => tracing::warn!(
                    file = %path.display(),
                    "a secret key file in an --allowed-keys directory is ignored, and should not be there"
                ),
                _ => {}
            }
            if paths.len() > ALLOWED_KEYS_MAX {
                return Err(KeyError::TooMany);
            }
        }
        paths.sort();
        for path in paths {
            let key = read_public_key(&path)?;
            self.insert(key, path.display().to_string())?;
        }
        Ok(())
    }

    /// Adds `key`; a key that is already there keeps its first origin.
    pub fn insert(&mut self, key: PublicKey, origin: String) -> Result<(), KeyError> {
        if !self.keys.contains_key(&key) && self.keys.len() >= ALLOWED_KEYS_MAX {
            return Err(KeyError::TooMany);
        }
        self.keys.entry(key).or_insert(origin);
        Ok(())
    }

    /// Where `key` was allowed from, if it is.
    pub fn origin(&self, key: &PublicKey) -> Option<&str> {
        self.keys.get(key).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

// ---------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------

/// Whether a bound endpoint can only be reached from this machine: `inproc://`,
/// `ipc://`, or TCP on a loopback address or `localhost`. Everything else
/// (`tcp://*:…`, `tcp://0.0.0.0:…`, an interface or another address) may be
/// reachable from the network.
pub fn is_loopback_endpoint(endpoint: &str) -> bool {
    if endpoint.starts_with("inproc://") || endpoint.starts_with("ipc://") {
        return true;
    }
    let Some(address) = endpoint.strip_prefix("tcp://") else {
        return false;
    };
    let Some((host, _port)) = address.rsplit_once(':') else {
        return false;
    };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn z85_matches_the_rfc_example() {
        // ZeroMQ RFC 32's test vector.
        let bytes = [0x86, 0x4F, 0xD2, 0x6F, 0xB5, 0x59, 0xF7, 0x5B];
        assert_eq!(z85_encode(&bytes).as_deref(), Some("HelloWorld"));
        assert_eq!(z85_decode("HelloWorld"), Some(bytes.to_vec()));
    }

    #[test]
    fn z85_refuses_bad_lengths_characters_and_overflow() {
        assert_eq!(z85_encode(&[1, 2, 3]), None);
        assert_eq!(z85_decode("Hello"), Some(vec![0x86, 0x4F, 0xD2, 0x6F]));
        assert_eq!(z85_decode("Hell"), None);
        assert_eq!(z85_decode("Hell\""), None);
        assert_eq!(z85_decode("Hell "), None);
        // "#####" is 85^5 - 1, more than 32 bits.
        assert_eq!(z85_decode("#####"), None);
    }

    proptest! {
        #[test]
        fn z85_round_trips(data in proptest::collection::vec(any::<u8>(), 0..16).prop_map(|mut v| { v.truncate(v.len() / 4 * 4); v })) {
            let text = z85_encode(&data).expect("a multiple of 4");
            prop_assert_eq!(z85_decode(&text), Some(data));
        }

        #[test]
        fn z85_decode_never_panics(text in ".{0,60}") {
            let _ = z85_decode(&text);
        }
    }

    #[test]
    fn our_z85_agrees_with_libzmq() {
        let pair = KeyPair::generate().expect("libzmq with CURVE");
        let ours = pair.public.to_z85();
        let theirs = zmq::z85_encode(pair.public.as_bytes()).expect("32 bytes");
        assert_eq!(ours, theirs);
    }

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    #[test]
    fn a_written_key_pair_reads_back() {
        let dir = dir();
        let pair = KeyPair::generate().expect("generate");
        let files = write_key_pair(dir.path(), &pair, "at test time").expect("write");
        assert_eq!(read_key_pair(&files.secret).expect("read back"), pair);
        assert_eq!(read_public_key(&files.public).expect("read back"), pair.public);
        let again = write_key_pair(dir.path(), &pair, "again");
        assert!(matches!(again, Err(KeyError::Exists { .. })), "{again:?}");
    }

    #[test]
    fn a_public_key_file_is_not_a_key_pair() {
        let dir = dir();
        let pair = KeyPair::generate().expect("generate");
        let files = write_key_pair(dir.path(), &pair, "now").expect("write");
        let err = read_key_pair(&files.public).expect_err("a public key file");
        assert!(err.to_string().contains("no secret-key"), "{err}");
        let err = read_public_key(&files.secret).expect_err("a secret key file");
        assert!(err.to_string().contains("holds a secret-key"), "{err}");
    }

    #[test]
    fn a_mismatched_pair_is_refused_without_showing_the_secret() {
        let dir = dir();
        let (a, b) = (KeyPair::generate().expect("a"), KeyPair::generate().expect("b"));
        let secret = z85_encode(b.secret().as_bytes()).expect("z85");
        let path = dir.path().join("mixed.key");
        std::fs::write(&path, format!("public-key = \"{}\"\nsecret-key = \"{secret}\"\n", a.public)).expect("write");
        let err = read_key_pair(&path).expect_err("mismatched");
        assert!(err.to_string().contains("does not belong"), "{err}");
        std::fs::write(&path, format!("public-key = \"{}\"\nsecret-key = \"{}~\"\n", a.public, &secret[..39]))
            .expect("write");
        let err = read_key_pair(&path).expect_err("bad secret");
        assert!(err.to_string().contains(":2: secret-key"), "{err}");
        assert!(!err.to_string().contains(&secret[..39]), "the error shows the secret: {err}");
        assert!(!format!("{:?}", b).contains(&secret), "Debug shows the secret");
    }

    #[test]
    fn allowed_keys_come_from_directories_and_lists() {
        let dir = dir();
        let keys: Vec<KeyPair> = (0..3).map(|_| KeyPair::generate().expect("generate")).collect();
        let pubs = dir.path().join("pubs");
        std::fs::create_dir(&pubs).expect("mkdir");
        for (i, k) in keys.iter().take(2).enumerate() {
            std::fs::write(pubs.join(format!("w{i}.pub")), k.public_file_text("now")).expect("write");
        }
        std::fs::write(pubs.join("README"), "not a key").expect("write");
        let list = dir.path().join("list.txt");
        std::fs::write(&list, format!("# one a line\n{}\n\n", keys[2].public)).expect("write");
        let allowed = AllowedKeys::load(&[pubs.clone(), list.clone()]).expect("load");
        assert_eq!(allowed.len(), 3);
        assert_eq!(allowed.origin(&keys[2].public), Some(format!("{}:2", list.display()).as_str()));
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).expect("mkdir");
        let err = AllowedKeys::load(&[empty]).expect_err("no keys");
        assert!(err.to_string().contains("holds no *.pub file"), "{err}");
        std::fs::write(&list, "not-a-key\n").expect("write");
        let err = AllowedKeys::load(&[list]).expect_err("garbage");
        assert!(err.to_string().contains("list.txt:1:"), "{err}");
    }

    /// Regression: a bare key holding `=` (a Z85 character) was read as `name = value`.
    #[test]
    fn a_bare_key_with_an_equals_sign_is_a_key() {
        let dir = dir();
        let text = "0000=".repeat(8);
        let key = PublicKey::from_z85(&text).expect("valid Z85");
        let list = dir.path().join("list.txt");
        std::fs::write(&list, format!("{text}\npublic-key = \"{}\"\n", "1111=".repeat(8))).expect("write");
        let allowed = AllowedKeys::load(&[list]).expect("load");
        assert_eq!(allowed.len(), 2);
        assert!(allowed.origin(&key).is_some());
    }

    #[test]
    fn broker_key_argument_is_a_file_or_a_key() {
        let pair = KeyPair::generate().expect("generate");
        assert_eq!(public_key_from_arg(&pair.public.to_z85()).expect("z85"), pair.public);
        let err = public_key_from_arg("/nonexistent/broker.pub").expect_err("neither");
        assert!(err.to_string().contains("neither a key file nor"), "{err}");
    }

    #[test]
    fn loopback_endpoints() {
        for local in [
            "tcp://127.0.0.1:6770",
            "tcp://127.1.2.3:1",
            "tcp://[::1]:6770",
            "tcp://localhost:1",
            "ipc:///tmp/x",
            "inproc://x",
        ] {
            assert!(is_loopback_endpoint(local), "{local}");
        }
        for open in [
            "tcp://0.0.0.0:6770",
            "tcp://*:6770",
            "tcp://[::]:6770",
            "tcp://10.0.0.1:6770",
            "tcp://eth0:6770",
            "ws://127.0.0.1:1",
        ] {
            assert!(!is_loopback_endpoint(open), "{open}");
        }
    }
}
