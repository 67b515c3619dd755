//! Reading a Lua 5.4 binary chunk (as `string.dump` writes it, with debug information) to
//! find an assignment to an upvalue that outlives the call, the one kind of state Lua cannot
//! make read-only at run time, and a to-be-closed variable (`local x <close>`), whose
//! `__close` Lua runs while it unwinds a stopped call, where the count hook may not reach it.
//!
//! A function that is still reachable once a policy has loaded keeps its upvalues for as long
//! as the state lives, so `local n = 0; function request_hash() n = n + 1 ... end` carries a
//! value from one request to the next. Such an assignment is an `OP_SETUPVAL` on one of the
//! function's own upvalues, or on an upvalue of a closure nested in it that resolves (through
//! `instack == 0` links) to one of them. Locals of the call itself (`instack == 1`) are fresh
//! on every call and may be assigned freely.
//!
//! A to-be-closed variable is an `OP_TBC` in any function of the chunk, nested ones included.
//! (The other value Lua closes, a generic `for`'s fourth value, needs a `__close` metamethod,
//! which the prelude lets no value have.)
//!
//! Owns: the dump format of the vendored Lua 5.4 (`ldump.c`) and those two rules. Must not
//! touch: Lua states; it reads bytes only.

/// An assignment to an upvalue that outlives the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct UpvalueWrite {
    /// The chunk name of the function, e.g. `=a.lua`.
    pub(super) source: String,
    /// The line of the assignment.
    pub(super) line: u32,
    /// The name of the upvalue (the local of the enclosing code), e.g. `count`.
    pub(super) name: String,
}

/// A to-be-closed variable declared in a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ToBeClosed {
    /// The chunk name of the function that declares it, e.g. `=a.lua`.
    pub(super) source: String,
    /// The line of the declaration.
    pub(super) line: u32,
}

/// A chunk this reader does not understand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read a Lua binary chunk: {0}")]
pub(super) struct DumpError(&'static str);

const SIGNATURE: &[u8] = b"\x1bLua";
const VERSION: u8 = 0x54;
const FORMAT: u8 = 0;
const LUAC_DATA: &[u8] = b"\x19\x93\r\n\x1a\n";
/// `OP_SETUPVAL A B`: `UpValue[B] := R[A]` (`lopcodes.h`).
const OP_SETUPVAL: u32 = 10;
/// `OP_TBC A`: mark variable A "to be closed" (`lopcodes.h`).
const OP_TBC: u32 = 55;
/// `ABSLINEINFO` marks a line delta stored in `abslineinfo` instead.
const ABSLINEINFO: i8 = -0x80;

/// The first assignment, in `chunk` (a dump of one function with its nested functions), to an
/// upvalue of that function: every such upvalue outlives a call of the function.
pub(super) fn persistent_upvalue_write(chunk: &[u8]) -> Result<Option<UpvalueWrite>, DumpError> {
    let mut r = Reader::new(chunk)?;
    r.function("", None)
}

/// The first to-be-closed variable declared in `chunk` (a dump of one function with its
/// nested functions), in any of its functions.
pub(super) fn to_be_closed(chunk: &[u8]) -> Result<Option<ToBeClosed>, DumpError> {
    let mut r = Reader::new(chunk)?;
    r.function("", None)?;
    Ok(r.closed)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    /// The first `OP_TBC` seen.
    closed: Option<ToBeClosed>,
}

/// What is known of a function once its code and upvalue descriptors are read.
struct Proto {
    linedefined: u32,
    code: Vec<u32>,
    lineinfo: Vec<i8>,
    abslineinfo: Vec<(u32, u32)>,
}

impl<'a> Reader<'a> {
    /// A reader past the header and the main function's upvalue count.
    fn new(bytes: &'a [u8]) -> Result<Reader<'a>, DumpError> {
        let mut r = Reader {
            bytes,
            at: 0,
            closed: None,
        };
        r.header()?;
        let _upvalues = r.byte()?;
        Ok(r)
    }

    fn take(&mut self, n: usize) -> Result<&[u8], DumpError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(DumpError("truncated"))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn byte(&mut self) -> Result<u8, DumpError> {
        Ok(self.take(1)?[0])
    }

    /// `dumpSize`: 7-bit groups, most significant first, the last one marked by 0x80.
    fn size(&mut self) -> Result<usize, DumpError> {
        let mut x: usize = 0;
        loop {
            let b = self.byte()?;
            x = x
                .checked_mul(128)
                .and_then(|x| x.checked_add(usize::from(b & 0x7f)))
                .ok_or(DumpError("size overflow"))?;
            if b & 0x80 != 0 {
                return Ok(x);
            }
        }
    }

    fn int(&mut self) -> Result<u32, DumpError> {
        u32::try_from(self.size()?).map_err(|_| DumpError("integer overflow"))
    }

    /// `dumpString`: size + 1 then the bytes; size 0 is NULL.
    fn string(&mut self) -> Result<Option<String>, DumpError> {
        match self.size()? {
            0 => Ok(None),
            n => Ok(Some(
                String::from_utf8_lossy(self.take(n - 1)?).into_owned(),
            )),
        }
    }

    fn header(&mut self) -> Result<(), DumpError> {
        if self.take(4)? != SIGNATURE {
            return Err(DumpError("not a binary chunk"));
        }
        if self.byte()? != VERSION || self.byte()? != FORMAT {
            return Err(DumpError("not Lua 5.4's format"));
        }
        if self.take(6)? != LUAC_DATA {
            return Err(DumpError("corrupted header"));
        }
        // Instruction, lua_Integer and lua_Number sizes, then the two check values.
        if self.take(3)? != [4, 8, 8] {
            return Err(DumpError("unexpected type sizes"));
        }
        self.take(16)?;
        Ok(())
    }

    /// `loadFunction`. `outer` says which upvalues of the enclosing function outlive a call
    /// of the dumped function (`None`: this is the dumped function, all of its do).
    fn function(
        &mut self,
        parent_source: &str,
        outer: Option<&[bool]>,
    ) -> Result<Option<UpvalueWrite>, DumpError> {
        let source = self.string()?.unwrap_or_else(|| parent_source.to_string());
        let linedefined = self.int()?;
        let _lastlinedefined = self.int()?;
        self.take(3)?; // numparams, is_vararg, maxstacksize
        let ncode = self.size()?;
        let code = self
            .take(ncode.checked_mul(4).ok_or(DumpError("code size"))?)?
            .chunks_exact(4)
            .map(|w| u32::from_ne_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        self.constants()?;
        let nup = self.size()?;
        let mut persistent = Vec::with_capacity(nup);
        for _ in 0..nup {
            let instack = self.byte()?;
            let idx = usize::from(self.byte()?);
            let _kind = self.byte()?;
            persistent.push(match outer {
                None => true,
                Some(outer) => instack == 0 && outer.get(idx).copied().unwrap_or(false),
            });
        }
        let mut found = None;
        for _ in 0..self.size()? {
            let inner = self.function(&source, Some(&persistent))?;
            found = found.or(inner);
        }
        let mut proto = Proto {
            linedefined,
            code,
            lineinfo: Vec::new(),
            abslineinfo: Vec::new(),
        };
        let names = self.debug(&mut proto)?;
        if self.closed.is_none() {
            if let Some(pc) = proto.code.iter().position(|&ins| ins & 0x7f == OP_TBC) {
                self.closed = Some(ToBeClosed {
                    source: source.clone(),
                    line: proto.line_of(pc),
                });
            }
        }
        if found.is_some() {
            return Ok(found);
        }
        for (pc, &ins) in proto.code.iter().enumerate() {
            if ins & 0x7f != OP_SETUPVAL {
                continue;
            }
            let b = ((ins >> 16) & 0xff) as usize;
            if persistent.get(b).copied().unwrap_or(false) {
                return Ok(Some(UpvalueWrite {
                    source,
                    line: proto.line_of(pc),
                    name: names
                        .get(b)
                        .cloned()
                        .flatten()
                        .unwrap_or_else(|| "?".to_string()),
                }));
            }
        }
        Ok(None)
    }

    fn constants(&mut self) -> Result<(), DumpError> {
        for _ in 0..self.size()? {
            match self.byte()? {
                // nil, false, true
                0 | 1 | 17 => {}
                // integer, float
                3 | 19 => {
                    self.take(8)?;
                }
                // short and long strings
                4 | 20 => {
                    self.string()?;
                }
                _ => return Err(DumpError("unknown constant type")),
            }
        }
        Ok(())
    }

    /// `loadDebug`; returns the upvalue names.
    fn debug(&mut self, proto: &mut Proto) -> Result<Vec<Option<String>>, DumpError> {
        let n = self.size()?;
        proto.lineinfo = self.take(n)?.iter().map(|&b| b as i8).collect();
        for _ in 0..self.size()? {
            let pc = self.int()?;
            let line = self.int()?;
            proto.abslineinfo.push((pc, line));
        }
        for _ in 0..self.size()? {
            self.string()?;
            self.size()?;
            self.size()?;
        }
        (0..self.size()?).map(|_| self.string()).collect()
    }
}

impl Proto {
    /// `luaG_getfuncline`: the source line of instruction `pc`.
    fn line_of(&self, pc: usize) -> u32 {
        if self.lineinfo.is_empty() {
            return self.linedefined;
        }
        let (mut line, mut at) = match self
            .abslineinfo
            .iter()
            .rev()
            .find(|(abs_pc, _)| *abs_pc as usize <= pc)
        {
            Some(&(abs_pc, abs_line)) => (i64::from(abs_line), abs_pc as usize + 1),
            None => (i64::from(self.linedefined), 0),
        };
        while at <= pc {
            let delta = self.lineinfo.get(at).copied().unwrap_or(0);
            if delta != ABSLINEINFO {
                line += i64::from(delta);
            }
            at += 1;
        }
        u32::try_from(line).unwrap_or(0)
    }
}
