//! Lua 5.4 string patterns, matched in Rust with a step count.
//!
//! Owns: the semantics of Lua patterns (a port of the matcher in Lua 5.4's `lstrlib.c`:
//! classes, sets, `*` `+` `-` `?`, anchors, captures and position captures, `%b`, `%f`,
//! back-references, the recursion limit of 200 and Lua's error messages) and the promise that
//! every step of a match is counted. Lua's own matcher backtracks inside one C call, which
//! the VM's instruction hook never interrupts: `("a"):rep(30):match(("a?"):rep(30) ..
//! ("a"):rep(30))` takes time exponential in the number of `?`. Here every attempt spends one
//! step, and every `chunk` steps the matcher asks its fuel function whether it may go on;
//! when it may not, the match stops with [`PatternError::Stopped`].
//!
//! Must not touch: Lua values, the budget or the clock (the fuel function decides), the
//! replacement rules of `gsub` (the caller applies them).

/// Captures per pattern (`LUA_MAXCAPTURES`).
pub(super) const MAX_CAPTURES: usize = 32;

/// Nesting of the recursive matcher (`MAXCCALLS` in `lstrlib.c`).
const MAX_DEPTH: u32 = 200;

/// The characters that make a pattern more than a plain string (`SPECIALS` in `lstrlib.c`).
const SPECIALS: &[u8] = b"^$*+?.([%-";

const CAP_UNFINISHED: isize = -1;
const CAP_POSITION: isize = -2;

/// One capture of a successful match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Capture {
    /// A substring of the subject: `start..end` (byte offsets).
    Span(usize, usize),
    /// A position capture `()`: the 1-based position Lua reports.
    Position(usize),
}

/// Why a match did not give an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum PatternError {
    /// The pattern is malformed, or uses a capture wrongly; the text is Lua's own message.
    #[error("{0}")]
    Malformed(String),
    /// The fuel function refused more steps (the caller knows whether the budget or the
    /// deadline ran out).
    #[error("pattern matching stopped: out of steps")]
    Stopped,
}

fn malformed(message: impl Into<String>) -> PatternError {
    PatternError::Malformed(message.into())
}

/// Whether `pattern` contains a character with a special meaning (else `find` may search for
/// it as a plain string).
pub(super) fn has_specials(pattern: &[u8]) -> bool {
    pattern.iter().any(|b| SPECIALS.contains(b))
}

/// Counts steps and hands them to the fuel function in batches of `chunk`.
pub(super) struct Steps<'f> {
    used: u32,
    chunk: u32,
    fuel: &'f mut dyn FnMut(u32) -> bool,
}

impl<'f> Steps<'f> {
    /// `fuel(n)` is told about every `chunk` (at least 1) steps and answers whether the work
    /// may go on.
    pub(super) fn new(chunk: u32, fuel: &'f mut dyn FnMut(u32) -> bool) -> Steps<'f> {
        Steps {
            used: 0,
            chunk: chunk.max(1),
            fuel,
        }
    }

    /// Spends one step.
    #[inline]
    pub(super) fn step(&mut self) -> Result<(), PatternError> {
        self.used += 1;
        if self.used >= self.chunk {
            self.flush()?;
        }
        Ok(())
    }

    /// Spends `n` steps.
    pub(super) fn spend(&mut self, n: usize) -> Result<(), PatternError> {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.used = self.used.saturating_add(n);
        if self.used >= self.chunk {
            self.flush()?;
        }
        Ok(())
    }

    /// Hands the steps not yet reported to the fuel function.
    pub(super) fn flush(&mut self) -> Result<(), PatternError> {
        let used = std::mem::take(&mut self.used);
        if (self.fuel)(used) {
            Ok(())
        } else {
            Err(PatternError::Stopped)
        }
    }
}

/// Finds `needle` in `haystack[init..]` as a plain string (Lua's `lmemfind`), spending a
/// step per 16 bytes looked at. Returns the start offset.
pub(super) fn find_plain(
    haystack: &[u8],
    needle: &[u8],
    init: usize,
    steps: &mut Steps<'_>,
) -> Result<Option<usize>, PatternError> {
    let Some(rest) = haystack.get(init..) else {
        return Ok(None);
    };
    let Some((&first, tail)) = needle.split_first() else {
        return Ok(Some(init));
    };
    if needle.len() > rest.len() {
        return Ok(None);
    }
    let last_start = rest.len() - needle.len();
    let mut at = 0;
    while at <= last_start {
        let window = &rest[at..=last_start];
        let Some(offset) = window.iter().position(|&b| b == first) else {
            steps.spend(window.len() / 16 + 1)?;
            return Ok(None);
        };
        let candidate = at + offset;
        steps.spend(offset / 16 + 1 + tail.len() / 16)?;
        if &rest[candidate + 1..candidate + needle.len()] == tail {
            return Ok(Some(init + candidate));
        }
        at = candidate + 1;
    }
    Ok(None)
}

/// One subject and one pattern (without a leading `^`: the caller handles anchoring), with
/// the capture state of the last attempt.
pub(super) struct Matcher<'a, 'f> {
    src: &'a [u8],
    pat: &'a [u8],
    level: usize,
    capture: [(usize, isize); MAX_CAPTURES],
    depth: u32,
    steps: &'a mut Steps<'f>,
}

impl<'a, 'f> Matcher<'a, 'f> {
    pub(super) fn new(src: &'a [u8], pat: &'a [u8], steps: &'a mut Steps<'f>) -> Self {
        Matcher {
            src,
            pat,
            level: 0,
            capture: [(0, 0); MAX_CAPTURES],
            depth: MAX_DEPTH,
            steps,
        }
    }

    /// Tries to match at `s`; the end of the match on success.
    pub(super) fn match_at(&mut self, s: usize) -> Result<Option<usize>, PatternError> {
        self.level = 0;
        self.depth = MAX_DEPTH;
        self.do_match(s, 0)
    }

    /// `find`/`match`: the first match at or after `init` (only at `init` when `anchor`), as
    /// `(start, end)`.
    pub(super) fn search(
        &mut self,
        init: usize,
        anchor: bool,
    ) -> Result<Option<(usize, usize)>, PatternError> {
        let mut s = init;
        loop {
            if let Some(e) = self.match_at(s)? {
                return Ok(Some((s, e)));
            }
            s += 1;
            if s > self.src.len() || anchor {
                return Ok(None);
            }
        }
    }

    /// The captures of the last successful match `s..e` (`push_captures`): the whole match
    /// when the pattern has none and `whole` is set.
    pub(super) fn captures(
        &self,
        s: usize,
        e: usize,
        whole: bool,
    ) -> Result<Vec<Capture>, PatternError> {
        let n = if self.level == 0 && whole {
            1
        } else {
            self.level
        };
        (0..n).map(|i| self.capture(i, s, e)).collect()
    }

    /// Capture `i` (0-based) of the last successful match `s..e` (`get_onecapture`); index 0
    /// of a pattern without captures is the whole match.
    pub(super) fn capture(&self, i: usize, s: usize, e: usize) -> Result<Capture, PatternError> {
        if i >= self.level {
            if i != 0 {
                return Err(malformed(format!("invalid capture index %{}", i + 1)));
            }
            return Ok(Capture::Span(s, e));
        }
        let (init, len) = self.capture[i];
        match len {
            CAP_UNFINISHED => Err(malformed("unfinished capture")),
            CAP_POSITION => Ok(Capture::Position(init + 1)),
            len => Ok(Capture::Span(init, init + len.unsigned_abs())),
        }
    }

    /// The pattern byte at `i`, or 0 past the end (C reads the terminating NUL).
    #[inline]
    fn pb(&self, i: usize) -> u8 {
        self.pat.get(i).copied().unwrap_or(0)
    }

    /// The subject byte at `i`, or 0 past the end.
    #[inline]
    fn sb(&self, i: usize) -> u8 {
        self.src.get(i).copied().unwrap_or(0)
    }

    fn do_match(&mut self, s: usize, p: usize) -> Result<Option<usize>, PatternError> {
        if self.depth == 0 {
            return Err(malformed("pattern too complex"));
        }
        self.depth -= 1;
        let result = self.match_here(s, p);
        self.depth += 1;
        result
    }

    /// `match` of `lstrlib.c`; its `goto init` tail calls are the loop.
    fn match_here(&mut self, mut s: usize, mut p: usize) -> Result<Option<usize>, PatternError> {
        loop {
            self.steps.step()?;
            if p == self.pat.len() {
                return Ok(Some(s));
            }
            match self.pat[p] {
                b'(' => {
                    return if self.pb(p + 1) == b')' {
                        self.start_capture(s, p + 2, CAP_POSITION)
                    } else {
                        self.start_capture(s, p + 1, CAP_UNFINISHED)
                    };
                }
                b')' => return self.end_capture(s, p + 1),
                b'$' if p + 1 == self.pat.len() => {
                    return Ok((s == self.src.len()).then_some(s));
                }
                b'%' if self.pb(p + 1) == b'b' => match self.match_balance(s, p + 2)? {
                    Some(next) => {
                        s = next;
                        p += 4;
                    }
                    None => return Ok(None),
                },
                b'%' if self.pb(p + 1) == b'f' => {
                    p += 2;
                    if self.pb(p) != b'[' {
                        return Err(malformed("missing '[' after '%f' in pattern"));
                    }
                    let ep = self.class_end(p)?;
                    let previous = if s == 0 { 0 } else { self.sb(s - 1) };
                    if !self.match_bracket_class(previous, p, ep - 1)
                        && self.match_bracket_class(self.sb(s), p, ep - 1)
                    {
                        p = ep;
                    } else {
                        return Ok(None);
                    }
                }
                b'%' if self.pb(p + 1).is_ascii_digit() => {
                    match self.match_capture(s, self.pb(p + 1))? {
                        Some(next) => {
                            s = next;
                            p += 2;
                        }
                        None => return Ok(None),
                    }
                }
                _ => {
                    let ep = self.class_end(p)?;
                    let suffix = self.pb(ep);
                    if !self.single_match(s, p, ep) {
                        if matches!(suffix, b'*' | b'?' | b'-') {
                            p = ep + 1;
                            continue;
                        }
                        return Ok(None);
                    }
                    match suffix {
                        b'?' => match self.do_match(s + 1, ep + 1)? {
                            Some(end) => return Ok(Some(end)),
                            None => p = ep + 1,
                        },
                        b'+' => return self.max_expand(s + 1, p, ep),
                        b'*' => return self.max_expand(s, p, ep),
                        b'-' => return self.min_expand(s, p, ep),
                        _ => {
                            s += 1;
                            p = ep;
                        }
                    }
                }
            }
        }
    }

    /// The end of the single-character class at `p` (`classend`).
    fn class_end(&self, p: usize) -> Result<usize, PatternError> {
        let plen = self.pat.len();
        match self.pb(p) {
            b'%' => {
                if p + 1 >= plen {
                    return Err(malformed("malformed pattern (ends with '%')"));
                }
                Ok(p + 2)
            }
            b'[' => {
                let mut q = p + 1;
                if self.pb(q) == b'^' {
                    q += 1;
                }
                // The first character after `[` (or `[^`) is part of the set, even a `]`.
                loop {
                    if q >= plen {
                        return Err(malformed("malformed pattern (missing ']')"));
                    }
                    let c = self.pat[q];
                    q += 1;
                    if c == b'%' && q < plen {
                        q += 1;
                    }
                    if self.pb(q) == b']' {
                        return Ok(q + 1);
                    }
                }
            }
            _ => Ok(p + 1),
        }
    }

    fn single_match(&self, s: usize, p: usize, ep: usize) -> bool {
        let Some(&c) = self.src.get(s) else {
            return false;
        };
        match self.pat[p] {
            b'.' => true,
            b'%' => match_class(c, self.pb(p + 1)),
            b'[' => self.match_bracket_class(c, p, ep - 1),
            literal => literal == c,
        }
    }

    /// Whether `c` is in the set `[...]` starting at `p` and closed at `ec`.
    fn match_bracket_class(&self, c: u8, mut p: usize, ec: usize) -> bool {
        let mut found = true;
        if self.pb(p + 1) == b'^' {
            found = false;
            p += 1;
        }
        loop {
            p += 1;
            if p >= ec {
                return !found;
            }
            if self.pat[p] == b'%' {
                p += 1;
                if match_class(c, self.pb(p)) {
                    return found;
                }
            } else if self.pb(p + 1) == b'-' && p + 2 < ec {
                p += 2;
                if self.pat[p - 2] <= c && c <= self.pat[p] {
                    return found;
                }
            } else if self.pat[p] == c {
                return found;
            }
        }
    }

    fn match_balance(&mut self, mut s: usize, p: usize) -> Result<Option<usize>, PatternError> {
        if p + 1 >= self.pat.len() {
            return Err(malformed("malformed pattern (missing arguments to '%b')"));
        }
        if self.sb(s) != self.pat[p] {
            return Ok(None);
        }
        let (open, close) = (self.pat[p], self.pat[p + 1]);
        let mut depth = 1u32;
        loop {
            s += 1;
            let Some(&c) = self.src.get(s) else {
                return Ok(None);
            };
            self.steps.step()?;
            if c == close {
                depth -= 1;
                if depth == 0 {
                    return Ok(Some(s + 1));
                }
            } else if c == open {
                depth += 1;
            }
        }
    }

    fn max_expand(&mut self, s: usize, p: usize, ep: usize) -> Result<Option<usize>, PatternError> {
        let mut i = 0;
        while self.single_match(s + i, p, ep) {
            self.steps.step()?;
            i += 1;
        }
        loop {
            if let Some(end) = self.do_match(s + i, ep + 1)? {
                return Ok(Some(end));
            }
            if i == 0 {
                return Ok(None);
            }
            i -= 1;
        }
    }

    fn min_expand(
        &mut self,
        mut s: usize,
        p: usize,
        ep: usize,
    ) -> Result<Option<usize>, PatternError> {
        loop {
            if let Some(end) = self.do_match(s, ep + 1)? {
                return Ok(Some(end));
            }
            if !self.single_match(s, p, ep) {
                return Ok(None);
            }
            s += 1;
        }
    }

    fn start_capture(
        &mut self,
        s: usize,
        p: usize,
        what: isize,
    ) -> Result<Option<usize>, PatternError> {
        if self.level >= MAX_CAPTURES {
            return Err(malformed("too many captures"));
        }
        self.capture[self.level] = (s, what);
        self.level += 1;
        let result = self.do_match(s, p)?;
        if result.is_none() {
            self.level -= 1;
        }
        Ok(result)
    }

    fn end_capture(&mut self, s: usize, p: usize) -> Result<Option<usize>, PatternError> {
        let Some(l) = (0..self.level)
            .rev()
            .find(|&l| self.capture[l].1 == CAP_UNFINISHED)
        else {
            return Err(malformed("invalid pattern capture"));
        };
        // A capture never starts after the position that closes it.
        self.capture[l].1 = isize::try_from(s - self.capture[l].0).unwrap_or(isize::MAX);
        let result = self.do_match(s, p)?;
        if result.is_none() {
            self.capture[l].1 = CAP_UNFINISHED;
        }
        Ok(result)
    }

    fn match_capture(&mut self, s: usize, digit: u8) -> Result<Option<usize>, PatternError> {
        let l = usize::from(digit.wrapping_sub(b'1'));
        if digit < b'1' || l >= self.level || self.capture[l].1 == CAP_UNFINISHED {
            return Err(malformed(format!(
                "invalid capture index %{}",
                i32::from(digit) - i32::from(b'0')
            )));
        }
        let (init, len) = self.capture[l];
        // A position capture has no text: it never matches (its length reads as huge in C).
        let Ok(len) = usize::try_from(len) else {
            return Ok(None);
        };
        self.steps.spend(len / 16)?;
        if self.src.len() - s >= len && self.src[init..init + len] == self.src[s..s + len] {
            Ok(Some(s + len))
        } else {
            Ok(None)
        }
    }
}

/// `match_class`: `%a`, `%d`, ... as in the C locale; upper case negates; any other
/// character stands for itself.
fn match_class(c: u8, class: u8) -> bool {
    let matched = match class.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c.is_ascii_control(),
        b'd' => c.is_ascii_digit(),
        b'g' => c.is_ascii_graphic(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        // C's isspace also counts the vertical tab, which Rust's is_ascii_whitespace does not.
        b's' => c.is_ascii_whitespace() || c == 0x0b,
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        b'z' => c == 0,
        _ => return class == c,
    };
    if class.is_ascii_lowercase() {
        matched
    } else {
        !matched
    }
}
