//! The scratch both HTTP/1 head parsers share (the request's in [`super::server`], the
//! response's in [`super::client`]): the spans of a head's fields in a per-thread list, and
//! httparse's header slots left uninitialised.
//!
//! Owns: [`Span`], [`with_spans`], [`header_slots`]. Must not touch: what a head means (each
//! parser reads its own start line and fields).

/// Where a piece of the head lies in the buffer.
pub type Span = (usize, usize);

/// Runs `f` with this thread's list for the spans of a head's fields, emptied. One list a thread,
/// reused for every head parsed on it (both legs): a head neither allocates one nor zeroes a
/// fixed array of its field limit for it, which the instruction profile showed to be the largest
/// single cost of parsing.
pub fn with_spans<R>(f: impl FnOnce(&mut Vec<(Span, Span)>) -> R) -> R {
    thread_local! {
        static SPANS: std::cell::RefCell<Vec<(Span, Span)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SPANS.with(|spans| {
        let mut spans = spans.borrow_mut();
        spans.clear();
        f(&mut spans)
    })
}

/// `N` slots for httparse's header fields, left uninitialised: httparse writes the ones it
/// fills (zeroing them all, 32 bytes a slot, was done for every head).
pub fn header_slots<'b, const N: usize>() -> [std::mem::MaybeUninit<httparse::Header<'b>>; N] {
    [const { std::mem::MaybeUninit::uninit() }; N]
}
