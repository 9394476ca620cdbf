//! The mesh encrypted and authenticated with ZeroMQ CURVE, with real
//! processes on loopback: `jobz keygen`, a broker with `--curve-key` and
//! `--allowed-keys`, workers and semaphores with their own keys, and every way
//! a peer can be refused. A libzmq without CURVE fails these tests; nothing here
//! is skipped.

mod support;

/// The workspace's own zmq-sys (`zmq-sys/`, patched in by the top-level
/// Cargo.toml) builds libzmq with libsodium. Without it the published zmq-sys
/// builds libzmq without CURVE, and the mesh cannot be encrypted.
#[test]
fn libzmq_has_curve() {
    assert_eq!(zmq::has("curve"), Some(true), "libzmq was built without CURVE: is zmq-sys/ patched in?");
    let pair = zmq::CurveKeyPair::new();
    assert!(pair.is_ok(), "cannot make a CURVE key pair: {:?}", pair.err());
}
