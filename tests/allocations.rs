//! Allocations on the request path, counted by a global allocator that counts per thread: the
//! pieces of the proxy that run for every request allocate a fixed number of times, whatever
//! the request carries (issue 11: "no allocation per request" where it can be had). Counts, not
//! time: these fail when a change adds an allocation to the hot path, never because the machine
//! is slow.

// A global allocator is an unsafe trait by definition; this one only counts, then forwards each
// call unchanged to the system allocator. Test code only: the gateway itself has no unsafe.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Method;
use hyper::body::Body as _;
use ringgate::wire::body::Body;
use ringgate::wire::client::head::{
    parse_raw_response, parse_response, request_head, Forwarded, RequestFraming,
};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded as it came.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as it came.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded as it came.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// What `f` allocated on this thread (allocations and reallocations), with its result.
fn allocations<T>(f: impl FnOnce() -> T) -> (usize, T) {
    let before = ALLOCATIONS.with(Cell::get);
    let out = f();
    (ALLOCATIONS.with(Cell::get) - before, out)
}

/// A connection's read buffer holding `bytes`, as it is once it has carried a message: shared
/// with the heads split off it, and reclaimed whole once they are gone.
fn used_buffer(bytes: &[u8]) -> bytes::BytesMut {
    let mut buf = bytes::BytesMut::with_capacity(8192);
    buf.extend_from_slice(b"warm up");
    drop(buf.split_to(4).freeze());
    buf.clear();
    buf.extend_from_slice(bytes);
    buf
}

fn headers(n: usize) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.append(
        "host",
        HeaderValue::from_static("gateway.example.test:5000"),
    );
    for i in 0..n {
        h.append(
            HeaderName::from_bytes(format!("x-client-{i}").as_bytes()).expect("name"),
            HeaderValue::from_str(&"v".repeat(10 + i * 7)).expect("value"),
        );
    }
    h
}

#[test]
fn the_forwarded_request_head_is_one_allocation_whatever_its_headers() {
    let client: SocketAddr = "[2001:db8::7]:4711".parse().expect("addr");
    for n in [0, 3, 12, 40] {
        let (mut parts, ()) = http::Request::builder()
            .method(Method::GET)
            .uri("/some/long/path?id=123456&other=value")
            .body(())
            .expect("request")
            .into_parts();
        parts.headers = headers(n);
        let forwarded = Forwarded {
            parts: &parts,
            client,
            proto: "https",
            framing: RequestFraming::Length(1234),
            upgrade: None,
        };
        let (count, head) = allocations(|| request_head(&forwarded));
        assert_eq!(count, 1, "{n} client headers: {count} allocations");
        let text = String::from_utf8_lossy(&head);
        assert!(text.contains("x-forwarded-for: 2001:db8::7\r\n"), "{text}");
        assert!(text.ends_with("content-length: 1234\r\n\r\n"), "{text}");
    }
}

/// Response headers a replica commonly sends (names the `http` crate knows: a custom name
/// costs one allocation of its own, which no copy of the head can save).
const REPLICA_HEADERS: [&str; 19] = [
    "content-type",
    "date",
    "server",
    "cache-control",
    "etag",
    "last-modified",
    "expires",
    "vary",
    "x-content-type-options",
    "content-language",
    "accept-ranges",
    "age",
    "link",
    "pragma",
    "x-frame-options",
    "x-xss-protection",
    "access-control-allow-origin",
    "strict-transport-security",
    "content-location",
];

#[test]
fn a_response_head_costs_the_same_allocations_with_two_headers_or_twenty() {
    let head = |n: usize| {
        let mut s = String::from("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n");
        for name in &REPLICA_HEADERS[..n - 1] {
            s.push_str(&format!("{name}: a value for {name}\r\n"));
        }
        s.push_str("\r\n");
        s
    };
    let count = |n: usize| {
        let raw = head(n);
        let mut buf = used_buffer(raw.as_bytes());
        let (count, parsed) = allocations(|| parse_response(&mut buf, &Method::GET));
        let parsed = parsed.expect("valid").expect("complete");
        assert_eq!(parsed.parts.headers.len(), n);
        let (adding_via, ()) = allocations(|| {
            let mut headers = parsed.parts.headers;
            headers.append(http::header::VIA, HeaderValue::from_static("1.1 gw"));
        });
        assert_eq!(adding_via, 0, "{n} headers: Via fits in the map as parsed");
        count
    };
    // The thread's list of field spans is made by the first head parsed on it and grows to the
    // largest: warm it, as a serving thread's is after its first requests.
    count(20);
    let (two, twenty) = (count(2), count(20));
    assert_eq!(
        two, twenty,
        "header values are slices of the head, split off the connection's buffer"
    );
    assert!(
        two <= 2,
        "{two} allocations for a response head (the header map)"
    );
}

#[test]
fn a_response_head_kept_as_bytes_is_one_allocation_for_up_to_eight_fields() {
    // What an HTTP/1 client is written: the head's fields stay where they are in it, their
    // places in one box with room for eight (past that, a list of its own).
    let count = |n: usize| {
        let mut s = String::from("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n");
        for name in &REPLICA_HEADERS[..n] {
            s.push_str(&format!("{name}: a value for {name}\r\n"));
        }
        s.push_str("\r\n");
        let mut buf = used_buffer(s.as_bytes());
        let (count, parsed) = allocations(|| parse_raw_response(&mut buf, &Method::GET));
        let parsed = parsed.expect("valid").expect("complete");
        assert_eq!(parsed.raw.fields().count(), n);
        count
    };
    count(19);
    assert_eq!(count(1), 1);
    assert_eq!(count(8), 1);
    assert_eq!(count(19), 2);
}

#[test]
fn a_body_in_memory_allocates_nothing_to_be_sent() {
    let bytes = Bytes::from_static(b"{\"status\":\"success\"}");
    let (count, body) = allocations(|| Body::full(bytes.clone()));
    assert_eq!(count, 0);
    assert_eq!(body.size_hint().exact(), Some(bytes.len() as u64));
}

#[test]
fn a_client_request_head_costs_the_same_allocations_with_two_headers_or_twenty() {
    use ringgate::wire::server::request::parse_request;
    let count = |n: usize| {
        let mut s = String::from("GET /home?id=123456 HTTP/1.1\r\nhost: gateway.example.test\r\n");
        for name in &REPLICA_HEADERS[..n - 1] {
            s.push_str(&format!("{name}: a value for {name}\r\n"));
        }
        s.push_str("\r\nGET /next");
        let mut buf = used_buffer(s.as_bytes());
        let (count, parsed) = allocations(|| parse_request(&mut buf));
        let head = parsed.expect("valid").expect("complete");
        assert_eq!(head.parts.headers.len(), n);
        assert_eq!(
            &buf[..],
            b"GET /next",
            "what follows the head stays in the buffer"
        );
        count
    };
    count(20); // warms this thread's list of field spans (see the response head's test)
    let (two, twenty) = (count(2), count(20));
    assert_eq!(two, twenty, "the head is split off the buffer, not copied");
    assert!(
        two <= 2,
        "{two} allocations for a request head (the header map)"
    );
}

#[test]
fn a_response_head_to_the_client_is_written_without_allocating() {
    use ringgate::wire::server::response::{write_head, Framing, Persistence};
    let mut headers = HeaderMap::new();
    for name in &REPLICA_HEADERS {
        headers.append(*name, HeaderValue::from_static("a value"));
    }
    let mut out = Vec::with_capacity(2048);
    let write = |out: &mut Vec<u8>| {
        out.clear();
        write_head(
            out,
            http::StatusCode::OK,
            &headers,
            Framing::Length {
                n: 2,
                declared: false,
            },
            Persistence::KeepAlive,
            false,
            Some(2),
        )
    };
    write(&mut out); // the first call of the second formats the date
    let (count, ()) = allocations(|| write(&mut out));
    assert_eq!(count, 0);
    assert!(out.ends_with(b"\r\n\r\n"));
}
