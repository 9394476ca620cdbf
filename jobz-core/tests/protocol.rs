//! The wire protocol: round trips, refusals, and no panic on any input.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use jobz_core::protocol::limits::*;
use jobz_core::protocol::*;
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// A counting allocator, per thread, to prove that refusing a huge input does
// not allocate anything near its size.
// ---------------------------------------------------------------------------

struct Counting;

thread_local! {
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // try_with: the counter may be gone while the thread is being torn down.
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + layout.size()));
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + new_size));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes allocated on this thread while running `f`.
fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATED.with(Cell::get);
    let value = f();
    (value, ALLOCATED.with(Cell::get) - before)
}

// ---------------------------------------------------------------------------
// Strategies: arbitrary valid messages of every kind
// ---------------------------------------------------------------------------

fn name() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z][a-z0-9_]{0,15}", "\\PC{1,20}".prop_filter("fits", |s| s.len() <= NAME_MAX_BYTES)]
}

fn id() -> impl Strategy<Value = String> {
    "[0-9a-f-]{1,36}"
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,60}"
}

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    // Years 1 to 9999, at millisecond precision: what the wire carries.
    (-62_135_596_800_000i64..253_402_300_799_999).prop_map(|ms| DateTime::from_timestamp_millis(ms).unwrap())
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..200)
}

fn lease_ref() -> impl Strategy<Value = LeaseRef> {
    (id(), any::<u64>()).prop_map(|(job_id, lease)| LeaseRef { job_id, lease })
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        prop_oneof![Just(Role::Worker), Just(Role::Semaphore)],
        (name(), text().prop_map(|h| clip(&h, NAME_MAX_BYTES).to_owned()), any::<u32>()),
        (0..=CONCURRENCY_MAX).prop_flat_map(|c| (Just(c), 0..=c)),
        prop::collection::vec((name(), "[0-9a-f]{16}").prop_map(|(name, digest)| ServedJob { name, digest }), 0..5),
        prop::collection::vec(
            (id(), any::<u64>(), any::<bool>()).prop_map(|(job_id, lease, done)| Held { job_id, lease, done }),
            0..5,
        ),
    )
        .prop_map(|(role, (name, host, pid), (concurrency, credit), jobs, holding)| Hello {
            role,
            name,
            host,
            pid,
            concurrency,
            credit,
            jobs,
            holding,
        })
}

fn params() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(name(), text(), 0..6)
}

fn fire_reason() -> impl Strategy<Value = FireReason> {
    prop::sample::select(FireReason::ALL.to_vec())
}

fn fire() -> impl Strategy<Value = Fire> {
    ((name(), text(), fire_reason(), name()), params(), (prop::option::of(id()), prop::option::of(id()))).prop_map(
        |((gate, key, reason, job_name), params, (run_id, parent_id))| Fire {
            gate,
            key,
            reason,
            job_name,
            params,
            run_id,
            parent_id,
        },
    )
}

fn gate_event(seq: u64) -> impl Strategy<Value = GateEvent> {
    (
        prop_oneof![Just(GateEventKind::Succeeded), Just(GateEventKind::FailedForGood)],
        (id(), name(), params(), id()),
        (any::<u32>(), time()),
    )
        .prop_map(move |(kind, (job_id, job_name, params, run_id), (attempt, at))| GateEvent {
            seq,
            kind,
            job_id,
            job_name,
            params,
            run_id,
            attempt,
            at,
        })
}

/// A valid page: increasing seqs from `from`, with gaps, `next` past them all.
fn events() -> impl Strategy<Value = Events> {
    (0..u64::MAX / 4, prop::collection::vec(1..5u64, 0..6), 0..3u64).prop_flat_map(|(from, gaps, extra)| {
        let seqs: Vec<u64> = gaps
            .iter()
            .scan(from, |seq, gap| {
                *seq += gap;
                Some(*seq - 1)
            })
            .collect();
        let next = seqs.last().map_or(from, |s| s + 1) + extra;
        let events: Vec<_> = seqs.into_iter().map(gate_event).collect();
        events.prop_map(move |events| Events { from, events, next })
    })
}

fn fired() -> impl Strategy<Value = Fired> {
    ((name(), text(), fire_reason()), (id(), any::<bool>(), prop::option::of(text())))
        .prop_map(|((gate, key, reason), (job_id, created, error))| Fired { gate, key, reason, job_id, created, error })
}

fn to_broker() -> impl Strategy<Value = ToBroker> {
    let outcome = prop::sample::select(Outcome::ALL.to_vec());
    prop_oneof![
        hello().prop_map(ToBroker::Hello),
        (0..=CONCURRENCY_MAX).prop_map(|n| ToBroker::Credit(Credit { n })),
        Just(ToBroker::Heartbeat),
        (id(), any::<u64>(), time()).prop_map(|(job_id, lease, at)| ToBroker::Started(Started { job_id, lease, at })),
        (id(), any::<u64>(), 0..u64::MAX / 2, bytes())
            .prop_map(|(job_id, lease, offset, data)| ToBroker::Output(Output { job_id, lease, offset, data })),
        (id(), any::<u64>(), 0.0f64..=100.0, prop::option::of(text())).prop_map(|(job_id, lease, percent, message)| {
            ToBroker::Progress(Progress { job_id, lease, percent, message })
        }),
        (
            (id(), any::<u64>(), outcome),
            (prop::option::of(any::<i32>()), prop::option::of(any::<i32>())),
            (time(), time()),
            (prop::option::of(text()), bytes()),
        )
            .prop_map(
                |((job_id, lease, status), (exit_code, signal), (started_at, finished_at), (error, output))| {
                    ToBroker::Result(ResultReport {
                        job_id,
                        lease,
                        status,
                        exit_code,
                        signal,
                        started_at,
                        finished_at,
                        error,
                        output,
                    })
                }
            ),
        prop::collection::vec(lease_ref(), 0..5).prop_map(|hand_back| ToBroker::Goodbye(Goodbye { hand_back })),
        ("[0-9a-f]{16}", any::<u64>())
            .prop_map(|(gates_digest, from)| ToBroker::Subscribe(Subscribe { gates_digest, from })),
        fire().prop_map(ToBroker::Fire),
    ]
}

fn to_worker() -> impl Strategy<Value = ToWorker> {
    prop_oneof![
        (
            1..u64::MAX / 2,
            0..u64::MAX / 2,
            prop::collection::vec(name(), 0..5),
            prop::option::of("https?://[a-z.:0-9]{1,30}")
        )
            .prop_map(|(heartbeat_ms, extra, drift, url)| ToWorker::Welcome(Welcome {
                heartbeat_ms,
                lease_timeout_ms: heartbeat_ms + extra,
                drift,
                url,
            })),
        (
            (id(), name(), id(), prop::option::of(id())),
            prop::collection::btree_map(name(), text(), 0..6),
            (any::<u32>(), any::<u64>()),
        )
            .prop_map(|((job_id, job_name, run_id, parent_id), params, (attempt, lease))| {
                ToWorker::Dispatch(Dispatch { job_id, job_name, params, run_id, parent_id, attempt, lease })
            }),
        lease_ref().prop_map(ToWorker::ResultAck),
        lease_ref().prop_map(ToWorker::Cancel),
        Just(ToWorker::Heartbeat),
        Just(ToWorker::Reconnect),
        text().prop_map(|message| ToWorker::Error(ErrorReply { message })),
        events().prop_map(ToWorker::Events),
        fired().prop_map(ToWorker::Fired),
    ]
}

/// Frames from anywhere: any count, any content, often starting like a real header.
fn junk_frames() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let header_then_junk = (any::<u8>(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(kind, junk)| {
        let mut frame = vec![b'J', b'Z', VERSION, kind];
        frame.extend(junk);
        frame
    });
    let frame = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        header_then_junk,
        prop::collection::vec(any::<u8>(), 0..4).prop_map(|mut f| {
            f.truncate(3);
            f
        }),
    ];
    prop::collection::vec(frame, 0..5)
}

fn refs(frames: &[Vec<u8>]) -> Vec<&[u8]> {
    frames.iter().map(Vec::as_slice).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_message_to_the_broker_round_trips(message in to_broker()) {
        let frames = try_encode(&message).expect("a valid message encodes");
        prop_assert_eq!(&frames, &encode(&message));
        prop_assert_eq!(decode_to_broker(&refs(&frames)), Ok(message));
    }

    #[test]
    fn every_message_to_a_worker_round_trips(message in to_worker()) {
        let frames = try_encode(&message).expect("a valid message encodes");
        prop_assert_eq!(decode_to_worker(&frames), Ok(message));
    }

    #[test]
    fn no_frames_make_the_decoder_panic(frames in junk_frames()) {
        // Reaching the end is the assertion; an Ok is fine too (a header with `{}`).
        let _ = decode_to_broker(&frames);
        let _ = decode_to_worker(&frames);
    }

    #[test]
    fn corrupted_real_messages_never_panic(message in to_broker(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let mut frames = encode(&message);
        let first = &mut frames[0];
        let i = at.index(first.len());
        first[i] = byte;
        // Any outcome is fine as long as there is one: these only must not panic.
        let _ = decode_to_broker(&frames);
        let len = cut.index(frames[0].len() + 1);
        frames[0].truncate(len);
        let _ = decode_to_broker(&frames);
        let _ = decode_to_worker(&frames);
    }

    #[test]
    fn any_version_but_ours_is_a_version_error(version in any::<u8>(), kind in any::<u8>(), body in bytes(), extra in 0usize..4) {
        prop_assume!(version != VERSION);
        let mut frames = vec![[b'J', b'Z', version, kind].iter().copied().chain(body).collect::<Vec<u8>>()];
        frames.extend(std::iter::repeat_n(Vec::new(), extra));
        prop_assert_eq!(decode_to_broker(&frames), Err(DecodeError::Version { got: version }));
        prop_assert_eq!(decode_to_worker(&frames), Err(DecodeError::Version { got: version }));
    }

    #[test]
    fn corrupted_real_messages_to_a_worker_never_panic(message in to_worker(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let mut frames = encode(&message);
        let first = &mut frames[0];
        let i = at.index(first.len());
        first[i] = byte;
        let _ = decode_to_worker(&frames);
        let len = cut.index(frames[0].len() + 1);
        frames[0].truncate(len);
        let _ = decode_to_worker(&frames);
        let _ = decode_to_broker(&frames);
    }

    #[test]
    fn the_worker_side_refuses_exactly_what_it_would_receive(message in to_worker(), spoil in 0u8..6) {
        let long_key = "k".repeat(GATE_KEY_MAX_BYTES + 1);
        let message = match (message, spoil) {
            (ToWorker::Events(mut m), 1) if !m.events.is_empty() => { m.next = m.events[m.events.len() - 1].seq; ToWorker::Events(m) }
            (ToWorker::Events(mut m), 2) if m.events.len() >= 2 => { m.events.swap(0, 1); ToWorker::Events(m) }
            (ToWorker::Events(mut m), 3) if !m.events.is_empty() => { m.events[0].job_id.clear(); ToWorker::Events(m) }
            (ToWorker::Events(mut m), 4) if m.from > 0 && !m.events.is_empty() => { m.events[0].seq = m.from - 1; ToWorker::Events(m) }
            (ToWorker::Fired(mut m), 1) => { m.key = long_key; ToWorker::Fired(m) }
            (ToWorker::Fired(mut m), 2) => { m.job_id.clear(); ToWorker::Fired(m) }
            (message, _) => message,
        };
        let sent = try_encode(&message);
        let received = decode_to_worker(&encode(&message));
        prop_assert_eq!(sent.is_ok(), received.is_ok(), "sent {:?} received {:?}", sent, received);
    }

    #[test]
    fn a_page_built_from_any_events_fits_and_resumes_exactly(from in 0..1000u64, gaps in prop::collection::vec(0..3u64, 0..40), value_len in 0usize..3000) {
        let mut seq = from;
        let events: Vec<GateEvent> = gaps.iter().map(|gap| {
            seq += gap;
            let event = sample_event(seq, value_len);
            seq += 1;
            event
        }).collect();
        let built = Events::page(from, events.clone());
        prop_assert!(built.skipped.is_empty());
        let page = built.page;
        prop_assert_eq!(page.from, from);
        prop_assert!(try_encode(&ToWorker::Events(page.clone())).is_ok());
        // The page is a prefix of the events, and `next` resumes right after it.
        prop_assert_eq!(&page.events[..], &events[..page.events.len()]);
        match events.get(page.events.len()) {
            Some(first_left) => prop_assert!(page.next <= first_left.seq && page.next > page.events.last().map_or(0, |e| e.seq)),
            None => prop_assert_eq!(page.next, events.last().map_or(from, |e| e.seq + 1)),
        }
    }

    #[test]
    fn the_sender_refuses_exactly_what_the_receiver_would(message in to_broker(), spoil in 0u8..6) {
        // Spoil a valid message in one of several ways (or not at all).
        let long = "x".repeat(NAME_MAX_BYTES + 1);
        let message = match (message, spoil) {
            (ToBroker::Hello(mut m), 1) => { m.name = long; ToBroker::Hello(m) }
            (ToBroker::Hello(mut m), 2) => { m.credit = m.concurrency.saturating_add(1); ToBroker::Hello(m) }
            (ToBroker::Progress(mut m), 1) => { m.percent = f64::NAN; ToBroker::Progress(m) }
            (ToBroker::Progress(mut m), 2) => { m.percent = 100.5; ToBroker::Progress(m) }
            (ToBroker::Started(mut m), 1) => { m.job_id.clear(); ToBroker::Started(m) }
            (ToBroker::Output(mut m), 1) => { m.offset = u64::MAX; m.data.push(1); ToBroker::Output(m) }
            (ToBroker::Credit(_), 1) => ToBroker::Credit(Credit { n: CONCURRENCY_MAX + 1 }),
            (ToBroker::Result(mut m), 1) => { m.error = Some("e".repeat(TEXT_MAX_BYTES + 1)); ToBroker::Result(m) }
            (ToBroker::Subscribe(mut m), 1) => { m.gates_digest.clear(); ToBroker::Subscribe(m) }
            (ToBroker::Subscribe(mut m), 2) => { m.gates_digest = "d".repeat(DIGEST_MAX_BYTES + 1); ToBroker::Subscribe(m) }
            (ToBroker::Fire(mut m), 1) => { m.gate.clear(); ToBroker::Fire(m) }
            (ToBroker::Fire(mut m), 2) => { m.key = "k".repeat(GATE_KEY_MAX_BYTES + 1); ToBroker::Fire(m) }
            (ToBroker::Fire(mut m), 3) => { m.run_id = Some(String::new()); ToBroker::Fire(m) }
            (ToBroker::Fire(mut m), 4) => { m.params.insert(long.clone(), "v".into()); ToBroker::Fire(m) }
            (message, _) => message,
        };
        let sent = try_encode(&message);
        let received = decode_to_broker(&encode(&message));
        prop_assert_eq!(sent.is_ok(), received.is_ok(), "sent {:?} received {:?}", sent, received);
    }
}

// ---------------------------------------------------------------------------
// Exhaustive and exact checks
// ---------------------------------------------------------------------------

const TO_BROKER_KINDS: [u8; 10] = [
    kind::HELLO,
    kind::CREDIT,
    kind::HEARTBEAT,
    kind::STARTED,
    kind::OUTPUT,
    kind::PROGRESS,
    kind::RESULT,
    kind::GOODBYE,
    kind::SUBSCRIBE,
    kind::FIRE,
];
const TO_WORKER_KINDS: [u8; 9] = [
    kind::WELCOME,
    kind::DISPATCH,
    kind::RESULT_ACK,
    kind::CANCEL,
    kind::BROKER_HEARTBEAT,
    kind::RECONNECT,
    kind::ERROR,
    kind::EVENTS,
    kind::FIRED,
];

#[test]
fn every_kind_byte_is_either_known_or_refused_as_unknown() {
    let bodies: [&[u8]; 5] = [b"", b"{}", b"null", b"{\"job_id\":\"j\",\"lease\":1}", b"[1,2"];
    for kind in 0..=u8::MAX {
        for body in bodies {
            for payloads in 0..=2 {
                let mut frames = vec![[b'J', b'Z', VERSION, kind].iter().chain(body).copied().collect::<Vec<u8>>()];
                frames.extend(std::iter::repeat_n(b"tail".to_vec(), payloads));
                let unknown = DecodeError::Kind { kind };
                let to_broker = decode_to_broker(&frames);
                let to_worker = decode_to_worker(&frames);
                if payloads == 2 {
                    assert_eq!(to_broker, Err(DecodeError::FrameCount { got: 3 }));
                    continue;
                }
                assert_eq!(
                    to_broker.err() == Some(unknown.clone()),
                    !TO_BROKER_KINDS.contains(&kind),
                    "kind {kind:#04x} to the broker"
                );
                assert_eq!(
                    to_worker.err() == Some(unknown),
                    !TO_WORKER_KINDS.contains(&kind),
                    "kind {kind:#04x} to a worker"
                );
            }
        }
    }
}

#[test]
fn unit_messages_decode_from_an_empty_object_and_ignore_unknown_fields() {
    assert_eq!(decode_to_broker(&[b"JZ\x01\x03{}".as_slice()]), Ok(ToBroker::Heartbeat));
    assert_eq!(decode_to_broker(&[b"JZ\x01\x03{\"later\":1}".as_slice()]), Ok(ToBroker::Heartbeat));
    assert_eq!(decode_to_worker(&[b"JZ\x01\x86 {} ".as_slice()]), Ok(ToWorker::Reconnect));
    assert_eq!(
        decode_to_broker(&[b"JZ\x01\x02{\"n\":3,\"later\":true}".as_slice()]),
        Ok(ToBroker::Credit(Credit { n: 3 }))
    );
}

#[test]
fn the_wire_format_is_what_protocol_md_says() {
    assert_eq!(encode(&ToBroker::Credit(Credit { n: 3 })), vec![b"JZ\x01\x02{\"n\":3}".to_vec()]);
    let at = DateTime::from_timestamp_millis(1_700_000_000_123).unwrap();
    let started = encode(&ToBroker::Started(Started { job_id: "j1".into(), lease: 7, at }));
    assert_eq!(started, vec![b"JZ\x01\x04{\"job_id\":\"j1\",\"lease\":7,\"at\":1700000000123}".to_vec()]);
    let output =
        encode(&ToBroker::Output(Output { job_id: "j1".into(), lease: 7, offset: 10, data: b"hi\n".to_vec() }));
    assert_eq!(output, vec![b"JZ\x01\x05{\"job_id\":\"j1\",\"lease\":7,\"offset\":10}".to_vec(), b"hi\n".to_vec()]);
    assert_eq!(encode(&ToWorker::Heartbeat), vec![b"JZ\x01\x85{}".to_vec()]);
}

#[test]
fn frame_counts_magic_and_truncation_are_refused() {
    let none: [&[u8]; 0] = [];
    assert_eq!(decode_to_broker(&none), Err(DecodeError::FrameCount { got: 0 }));
    assert_eq!(decode_to_broker(&[b"JZ\x01".as_slice()]), Err(DecodeError::Truncated { len: 3 }));
    assert_eq!(decode_to_broker(&[b"".as_slice()]), Err(DecodeError::Truncated { len: 0 }));
    assert_eq!(decode_to_broker(&[b"ZJ\x01\x03{}".as_slice()]), Err(DecodeError::Magic { got: *b"ZJ" }));
    // A heartbeat with a payload, an output chunk without one.
    assert_eq!(
        decode_to_broker(&[b"JZ\x01\x03{}".as_slice(), b"x"]),
        Err(DecodeError::Frames { message: "Heartbeat", expected: 1, got: 2 })
    );
    assert_eq!(
        decode_to_broker(&[b"JZ\x01\x05{\"job_id\":\"j\",\"lease\":1,\"offset\":0}".as_slice()]),
        Err(DecodeError::Frames { message: "Output", expected: 2, got: 1 })
    );
    // A message to a worker sent to the broker is an unknown kind there.
    assert_eq!(decode_to_broker(&encode(&ToWorker::Reconnect)), Err(DecodeError::Kind { kind: kind::RECONNECT }));
    assert!(matches!(decode_to_broker(&[b"JZ\x01\x02{\"n\":-1}".as_slice()]), Err(DecodeError::Json { .. })));
    assert!(matches!(decode_to_broker(&[b"JZ\x01\x02{\"n\":1".as_slice()]), Err(DecodeError::Json { .. })));
}

#[test]
fn oversized_frames_are_refused_before_parsing_and_without_allocating_their_size() {
    // The counter sees allocations at all.
    assert!(allocated_by(|| vec![0u8; 10_000]).1 >= 10_000);
    // A frame far over the limit, made of the start of a valid body: a parser
    // would have to read all of it to find anything wrong.
    let mut huge = b"JZ\x01\x07{\"error\":\"".to_vec();
    huge.resize(64 * FRAME_MAX_BYTES, b'a');
    let (result, allocated) = allocated_by(|| decode_to_broker(&[huge.as_slice(), b""]));
    assert_eq!(result, Err(DecodeError::TooLarge { what: "the header frame", len: huge.len(), max: FRAME_MAX_BYTES }));
    assert!(allocated < 4096, "refusing allocated {allocated} bytes");

    let payload = vec![0u8; PAYLOAD_MAX_BYTES + 1];
    let head = b"JZ\x01\x05{\"job_id\":\"j\",\"lease\":1,\"offset\":0}";
    let (result, allocated) = allocated_by(|| decode_to_broker(&[head.as_slice(), &payload]));
    assert_eq!(
        result,
        Err(DecodeError::TooLarge { what: "the payload frame", len: payload.len(), max: PAYLOAD_MAX_BYTES })
    );
    assert!(allocated < 4096, "refusing allocated {allocated} bytes");
}

#[test]
fn a_frame_just_within_the_limit_is_parsed() {
    let message =
        ToBroker::Output(Output { job_id: "j".into(), lease: 1, offset: 0, data: vec![b'x'; PAYLOAD_MAX_BYTES] });
    assert_eq!(decode_to_broker(&try_encode(&message).unwrap()), Ok(message));
}

#[test]
fn huge_counts_inside_the_json_are_refused_with_bounded_allocation() {
    // JOBS_MAX + 1 served jobs, each within limits: refused for the count.
    let jobs: Vec<String> = (0..=JOBS_MAX).map(|i| format!("{{\"name\":\"j{i}\",\"digest\":\"d\"}}")).collect();
    let body = format!(
        "{{\"role\":\"worker\",\"name\":\"w\",\"host\":\"h\",\"pid\":1,\"concurrency\":1,\"credit\":1,\"jobs\":[{}],\"holding\":[]}}",
        jobs.join(",")
    );
    let frame: Vec<u8> = b"JZ\x01\x01".iter().chain(body.as_bytes()).copied().collect();
    let (result, allocated) = allocated_by(|| decode_to_broker(&[frame.as_slice()]));
    assert_eq!(result, Err(DecodeError::TooLarge { what: "Hello.jobs (count)", len: JOBS_MAX + 1, max: JOBS_MAX }));
    // What serde builds is bounded by a small multiple of the frame, never by a claimed size.
    assert!(allocated < 8 * frame.len() + 64 * 1024, "allocated {allocated} for a {}-byte frame", frame.len());

    // A claimed offset near u64::MAX cannot overflow the receiver's arithmetic.
    let overflow = encode(&ToBroker::Output(Output { job_id: "j".into(), lease: 1, offset: u64::MAX, data: vec![1] }));
    assert_eq!(
        decode_to_broker(&overflow),
        Err(DecodeError::Invalid { what: "Output.offset", reason: "overflows with the chunk's length" })
    );
    // Numbers too large for their field are refused, not wrapped.
    assert!(matches!(decode_to_broker(&[b"JZ\x01\x02{\"n\":4294967296}".as_slice()]), Err(DecodeError::Json { .. })));
    // Deep nesting hits serde_json's recursion limit, not the stack.
    let deep: Vec<u8> = b"JZ\x01\x02{\"n\":".iter().copied().chain(std::iter::repeat_n(b'[', 100_000)).collect();
    assert!(matches!(decode_to_broker(&[deep.as_slice()]), Err(DecodeError::Json { .. })));
}

#[test]
fn field_limits_are_checked_on_both_sides() {
    let dispatch = |params: BTreeMap<String, String>| {
        ToWorker::Dispatch(Dispatch {
            job_id: "j".into(),
            job_name: "n".into(),
            params,
            run_id: "r".into(),
            parent_id: None,
            attempt: 1,
            lease: 1,
        })
    };
    let too_many: BTreeMap<String, String> = (0..=PARAMS_MAX).map(|i| (format!("p{i}"), "v".into())).collect();
    let expected = DecodeError::TooLarge { what: "Dispatch.params (count)", len: PARAMS_MAX + 1, max: PARAMS_MAX };
    assert_eq!(try_encode(&dispatch(too_many.clone())), Err(EncodeError(expected.clone())));
    assert_eq!(decode_to_worker(&encode(&dispatch(too_many))), Err(expected));

    let long_value = BTreeMap::from([("p".to_string(), "v".repeat(PARAM_VALUE_MAX_BYTES + 1))]);
    assert!(matches!(decode_to_worker(&encode(&dispatch(long_value))), Err(DecodeError::TooLarge { .. })));
    let fits = BTreeMap::from([("p".to_string(), "v".repeat(PARAM_VALUE_MAX_BYTES))]);
    assert!(decode_to_worker(&encode(&dispatch(fits))).is_ok());

    let welcome = ToWorker::Welcome(Welcome { heartbeat_ms: 1000, lease_timeout_ms: 10, drift: vec![], url: None });
    assert!(matches!(try_encode(&welcome), Err(EncodeError(DecodeError::Invalid { .. }))));
}

#[test]
fn a_body_too_large_for_the_frame_is_refused_by_the_sender() {
    // Every param within its own limit, but JSON escaping of control characters
    // makes the whole body larger than a frame may be.
    let params: BTreeMap<String, String> =
        (0..PARAMS_MAX).map(|i| (format!("p{i}"), "\u{1}".repeat(PARAM_VALUE_MAX_BYTES))).collect();
    let message = ToWorker::Dispatch(Dispatch {
        job_id: "j".into(),
        job_name: "n".into(),
        params,
        run_id: "r".into(),
        parent_id: None,
        attempt: 1,
        lease: 1,
    });
    assert!(matches!(try_encode(&message), Err(EncodeError(DecodeError::TooLarge { what: "the header frame", .. }))));
}

#[test]
fn outcomes_convert_to_domain_statuses() {
    use jobz_core::Status;
    let statuses: Vec<Status> = Outcome::ALL.into_iter().map(Status::from).collect();
    assert_eq!(statuses, [Status::Succeeded, Status::Failed, Status::TimedOut, Status::Cancelled]);
}

#[test]
fn digest_is_stable_and_short() {
    assert_eq!(digest("command: echo hi"), digest("command: echo hi"));
    assert_ne!(digest("command: echo hi"), digest("command: echo ho"));
    assert_eq!(digest("foobar"), "85944171f73967e8");
    assert_eq!(digest("x").len(), 16);
}

// ---------------------------------------------------------------------------
// Gates: Subscribe, Fire, Events, Fired
// ---------------------------------------------------------------------------

fn sample_event(seq: u64, value_len: usize) -> GateEvent {
    GateEvent {
        seq,
        kind: GateEventKind::Succeeded,
        job_id: format!("job-{seq}"),
        job_name: "shard".into(),
        params: BTreeMap::from([
            ("date".to_string(), "2026_01_02".to_string()),
            ("blob".into(), "x".repeat(value_len)),
        ]),
        run_id: "run-1".into(),
        attempt: 1,
        at: DateTime::from_timestamp_millis(1_700_000_000_000 + seq as i64).unwrap(),
    }
}

#[test]
fn gate_messages_have_the_wire_format_protocol_md_shows() {
    assert_eq!(
        encode(&ToBroker::Subscribe(Subscribe { gates_digest: "0123456789abcdef".into(), from: 42 })),
        vec![b"JZ\x01\x09{\"gates_digest\":\"0123456789abcdef\",\"from\":42}".to_vec()]
    );
    let fire = Fire {
        gate: "all_shards_done".into(),
        key: "2026_01_02".into(),
        reason: FireReason::Then,
        job_name: "build_index".into(),
        params: BTreeMap::from([("date".to_string(), "2026_01_02".to_string())]),
        run_id: Some("r1".into()),
        parent_id: Some("j9".into()),
    };
    let body = br#"{"gate":"all_shards_done","key":"2026_01_02","reason":"then","job_name":"build_index","params":{"date":"2026_01_02"},"run_id":"r1","parent_id":"j9"}"#;
    assert_eq!(encode(&ToBroker::Fire(fire)), vec![[b"JZ\x01\x0A".as_slice(), body].concat()]);
    let event = GateEvent {
        seq: 7,
        kind: GateEventKind::FailedForGood,
        job_id: "j7".into(),
        job_name: "shard".into(),
        params: BTreeMap::new(),
        run_id: "r1".into(),
        attempt: 3,
        at: DateTime::from_timestamp_millis(1_700_000_000_123).unwrap(),
    };
    assert_eq!(
        encode(&ToWorker::Events(Events { from: 5, events: vec![event], next: 8 })),
        vec![b"JZ\x01\x88{\"from\":5,\"events\":[{\"seq\":7,\"kind\":\"failed_for_good\",\"job_id\":\"j7\",\"job_name\":\"shard\",\"params\":{},\"run_id\":\"r1\",\"attempt\":3,\"at\":1700000000123}],\"next\":8}".to_vec()]
    );
    let fired = Fired {
        gate: "g".into(),
        key: "k".into(),
        reason: FireReason::Timeout,
        job_id: "j1".into(),
        created: true,
        error: None,
    };
    assert_eq!(
        encode(&ToWorker::Fired(fired.clone())),
        vec![b"JZ\x01\x89{\"gate\":\"g\",\"key\":\"k\",\"reason\":\"timeout\",\"job_id\":\"j1\",\"created\":true,\"error\":null}".to_vec()]
    );
    // `error` may be absent: a broker that never refuses a fire need not send it.
    assert_eq!(
        decode_to_worker(&[
            b"JZ\x01\x89{\"gate\":\"g\",\"key\":\"k\",\"reason\":\"timeout\",\"job_id\":\"j1\",\"created\":true}"
                .as_slice()
        ]),
        Ok(ToWorker::Fired(fired))
    );
}

#[test]
fn fired_without_a_job_is_valid_only_with_an_error() {
    let fired = |job_id: &str, error: Option<&str>| {
        ToWorker::Fired(Fired {
            gate: "g".into(),
            key: String::new(),
            reason: FireReason::Then,
            job_id: job_id.into(),
            created: false,
            error: error.map(Into::into),
        })
    };
    assert!(try_encode(&fired("", None)).is_err());
    assert!(try_encode(&fired("", Some("job build_index: param date refused"))).is_ok());
    assert!(try_encode(&fired("j1", None)).is_ok());
    // An empty key is a key (a key template may fill to nothing).
    assert_eq!(decode_to_worker(&encode(&fired("j1", None))), Ok(fired("j1", None)));
}

#[test]
fn an_events_page_must_stay_in_seq_order_within_from_and_next() {
    let page = |from, seqs: &[u64], next| {
        ToWorker::Events(Events { from, events: seqs.iter().map(|s| sample_event(*s, 0)).collect(), next })
    };
    assert!(decode_to_worker(&encode(&page(3, &[3, 4, 9], 10))).is_ok());
    assert!(decode_to_worker(&encode(&page(3, &[], 3))).is_ok());
    assert!(decode_to_worker(&encode(&page(3, &[], 7))).is_ok(), "the broker may skip seqs");
    let invalid = |what| {
        Err(DecodeError::Invalid {
            what,
            reason: if what == "Events.next" { "is not past every event" } else { "is not increasing from `from`" },
        })
    };
    assert_eq!(decode_to_worker(&encode(&page(3, &[2], 10))), invalid("Events.events.seq"));
    assert_eq!(decode_to_worker(&encode(&page(3, &[4, 4], 10))), invalid("Events.events.seq"));
    assert_eq!(decode_to_worker(&encode(&page(3, &[5, 4], 10))), invalid("Events.events.seq"));
    assert_eq!(decode_to_worker(&encode(&page(3, &[4], 4))), invalid("Events.next"));
    assert_eq!(decode_to_worker(&encode(&page(3, &[], 2))), invalid("Events.next"));
    assert_eq!(decode_to_worker(&encode(&page(3, &[u64::MAX], u64::MAX))), invalid("Events.next"));
    let too_many: Vec<u64> = (0..=EVENTS_PAGE_MAX as u64).collect();
    assert_eq!(
        decode_to_worker(&encode(&page(0, &too_many, EVENTS_PAGE_MAX as u64 + 1))),
        Err(DecodeError::TooLarge { what: "Events.events (count)", len: EVENTS_PAGE_MAX + 1, max: EVENTS_PAGE_MAX })
    );
}

#[test]
fn pages_are_cut_by_count_and_by_bytes_and_skip_what_can_never_travel() {
    // By count: 2500 small events make pages of 1000, 1000, 500, then an empty one.
    let all: Vec<GateEvent> = (0..2500).map(|s| sample_event(s, 0)).collect();
    let mut from = 0;
    let mut sizes = Vec::new();
    loop {
        let built = Events::page(from, all.iter().filter(|e| e.seq >= from).cloned());
        sizes.push(built.page.events.len());
        if built.page.events.is_empty() {
            assert_eq!(built.page.next, from);
            break;
        }
        assert!(try_encode(&ToWorker::Events(built.page.clone())).is_ok());
        from = built.page.next;
    }
    assert_eq!(sizes, [EVENTS_PAGE_MAX, EVENTS_PAGE_MAX, 500, 0]);

    // By bytes: events of ~4 KiB each make pages well under 1000 events that still fit a frame.
    let big: Vec<GateEvent> = (0..1000).map(|s| sample_event(s, PARAM_VALUE_MAX_BYTES)).collect();
    let built = Events::page(0, big);
    let n = built.page.events.len();
    assert!(n > 100 && n < 1000, "{n} events of 4 KiB in a page");
    let frames = try_encode(&ToWorker::Events(built.page.clone())).expect("a built page always fits");
    assert!(frames[0].len() <= FRAME_MAX_BYTES);
    assert_eq!(built.page.next, n as u64);

    // An event too large for any page is skipped, and the page goes on past it.
    let mut huge = sample_event(1, 0);
    huge.params = (0..PARAMS_MAX).map(|i| (format!("p{i}"), "\"".repeat(PARAM_VALUE_MAX_BYTES))).collect();
    let built = Events::page(0, vec![sample_event(0, 0), huge, sample_event(2, 0)]);
    assert_eq!(built.skipped, [1]);
    assert_eq!(built.page.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [0, 2]);
    assert_eq!(built.page.next, 3);
}

#[test]
fn gate_events_and_fires_convert_to_the_pipeline_types_and_back() {
    use jobz_core::gates::UpstreamEvent;
    use jobz_core::pipeline::{GateReason, NewJob, Origin};
    let event = sample_event(3, 2);
    let UpstreamEvent::Succeeded(facts) = event.upstream() else { panic!("a success") };
    assert_eq!((facts.id.as_str(), facts.job_name.as_str(), facts.run_id.as_str()), ("job-3", "shard", "run-1"));
    assert_eq!(facts.params, event.params);
    let failed = GateEvent { kind: GateEventKind::FailedForGood, ..event };
    assert!(matches!(failed.upstream(), UpstreamEvent::FailedForGood(_)));

    for reason in [GateReason::Then, GateReason::Timeout, GateReason::Failure] {
        let job = NewJob {
            job_name: "merge".into(),
            params: BTreeMap::from([("date".to_string(), "d".to_string())]),
            run_id: Some("r".into()),
            parent_id: None,
            origin: Origin::Gate { gate: "g".into(), key: "d".into(), reason },
        };
        let fire = Fire::from_new_job(&job).expect("a gate's job");
        assert_eq!(GateReason::from(fire.reason), reason);
        assert_eq!(fire.new_job(), job);
    }
    let plain =
        NewJob { job_name: "x".into(), params: BTreeMap::new(), run_id: None, parent_id: None, origin: Origin::Start };
    assert_eq!(Fire::from_new_job(&plain), None);
}

const GATES: &str = r#"
jobs:
  shard: { command: "echo {date}", params: { date: { required: true } } }
  merge: { command: "echo {date}", params: { date: { required: true } } }
  notify: { command: "echo {what}", params: { what: { required: true } } }
gates:
  done:
    after: [ shard ]
    count: 10
    key: "{date}"
    then: { job: merge, params: { date: "{date}" } }
    timeout: 1h
    on_failure: { job: notify, params: { what: "gate {gate} {key}" } }
"#;

fn gates_file(text: &str) -> config::JobFile {
    config::parse("gates.yaml", text).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_gates_digest_sees_every_gate_setting_and_nothing_else() {
    let base = jobz_core::gates::digest(&gates_file(GATES));
    assert_eq!(base.len(), 16);
    assert_eq!(base, jobz_core::gates::digest(&gates_file(GATES)));
    // Layout, comments and key order do not matter...
    let reordered =
        GATES.replace("    count: 10\n    key: \"{date}\"\n", "    key: \"{date}\"   # by day\n    count: 10\n");
    assert_ne!(reordered, GATES);
    assert_eq!(jobz_core::gates::digest(&gates_file(&reordered)), base);
    // ...nor do the jobs' own definitions (their digests cover them).
    let other_command = GATES.replace("shard: { command: \"echo {date}\"", "shard: { command: \"true {date}\"");
    assert_eq!(jobz_core::gates::digest(&gates_file(&other_command)), base);
    // Every gate setting does.
    for (from, to) in [
        ("count: 10", "count: 9"),
        ("key: \"{date}\"", "key: \"d{date}\""),
        ("then: { job: merge, params: { date: \"{date}\" } }", "then: { job: merge }"),
        ("timeout: 1h", "timeout: 2h"),
        ("gate {gate} {key}", "gate {key}"),
        ("on_failure: { job: notify", "on_timeout: { job: notify"),
        ("  done:\n", "  done2:\n"),
    ] {
        let changed = GATES.replace(from, to);
        assert_ne!(changed, GATES, "{from}");
        assert_ne!(jobz_core::gates::digest(&gates_file(&changed)), base, "{from} -> {to}");
    }
}

#[test]
fn a_timeout_fire_conflicts_with_every_other_reason_of_the_key() {
    use jobz_core::gates::fire_conflicts;
    use jobz_core::pipeline::GateReason::*;
    assert!(!fire_conflicts(&[], Then));
    assert!(!fire_conflicts(&[], Timeout));
    assert!(!fire_conflicts(&[Failure], Then), "a failed key may still complete");
    assert!(!fire_conflicts(&[Then], Failure));
    assert!(!fire_conflicts(&[Then], Then), "a repeat is the same fire, not a conflict");
    assert!(!fire_conflicts(&[Timeout], Timeout));
    assert!(fire_conflicts(&[Then], Timeout));
    assert!(fire_conflicts(&[Failure], Timeout));
    assert!(fire_conflicts(&[Timeout], Then));
    assert!(fire_conflicts(&[Timeout], Failure));
}
