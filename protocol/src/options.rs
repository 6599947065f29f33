//! The guest program's `zc.*` options on the kernel command line (`/proc/cmdline`):
//! parsed by the guest ([`Options::from_map`]), written by the VMM
//! ([`Options::to_cmdline`]).
//!
//! Recognised options:
//! - `zc.role=guest|host` (default `guest`): which program to be (the guest program's
//!   `guest.rs` and `host.rs`).
//! - `zc.test=STEP[,STEP...]` (guest role): what to run, in order. Steps: `panic`
//!   and `hang` (end-to-end hooks for the VMM), `disk-roundtrip` (write, drop caches,
//!   read back and check a file on the test disk), `send:<file>` (send
//!   `/mnt/<file>` to the TCP peer with read+write), `scratch-copy:<file>` (copy
//!   `/mnt/<file>` to the scratch disk with read+write and fsync, for the host to
//!   read back) and `methods` (the method suite, `docs/method-suite.md`).
//! - `zc.methods=NAME[,NAME...]|all` (default `all`), `zc.file=NAME` (default
//!   `payload.bin`), `zc.size=BYTES` (default: the whole file) and
//!   `zc.chunk=BYTES` (default 65536, a multiple of 4096): what the `methods` step
//!   runs, from which file on the test disk, how much, in which chunks.
//! - `zc.cards=VARIANT:METHODS[/VARIANT:METHODS...]` (instead of `zc.methods`): one
//!   boot for several NIC variants, one card each: card `n` (the `n`-th entry; the
//!   guest finds it by MAC, `addr::Card`) runs its METHODS (`all` or a comma list),
//!   to its own peer, each span and report named `<method>@<VARIANT>`
//!   (`marker::qualified_span`). The entries run in order, each card's methods in
//!   turn. E.g. `zc.cards=sg-on:all/sg-off:sendfile,mmap_zerocopy`.
//! - `zc.ip=A.B.C.D/N` (guest role, default `10.0.2.15/24`): eth0's address.
//! - `zc.peer=A.B.C.D:PORT` (guest role, default `10.0.2.2:7878`): the TCP peer.
//! - `zc.disk=rw|ro` (guest role, default `rw`): how `/dev/vda` is mounted on `/mnt`.
//! - `zc.exit=N` (guest role, 0..=255): the exit status to report instead of 0.
//! - `zc.outdir=/abs/path` (host role, required): the host directory shared
//!   read-write as `zcout`.
//!
//! Parsing is whitespace splitting only (no quote handling, which the VMM never
//! needs), everything after the first `=` is the value, and a repeated key keeps its
//! last value, as the kernel does for its own parameters.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::str::FromStr;

use crate::addr::{Card, DEFAULT_PEER, GUEST_IP, GUEST_PREFIX, MAX_CARDS};
use crate::marker::valid_variant;
use crate::method::{Direction, Method};

/// An option that does not parse: one line that names the option, its value and
/// what is expected instead (e.g. `zc.chunk=1000: expected a multiple of 4096...`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OptionsError {
    message: String,
}

impl OptionsError {
    fn new(message: impl Into<String>) -> OptionsError {
        OptionsError {
            message: message.into(),
        }
    }
}

/// Result with [`OptionsError`].
pub type Result<T> = std::result::Result<T, OptionsError>;

/// Default `zc.file`: the payload `zc-image disk` puts on the test disk.
pub const DEFAULT_FILE: &str = "payload.bin";
/// Default `zc.chunk`: 64 KiB, the table's chunk.
pub const DEFAULT_CHUNK: usize = 64 << 10;
/// Chunks are whole pages: O_DIRECT needs aligned offsets and lengths, and the
/// VMM's dirty-page samples are per page.
pub const CHUNK_ALIGN: usize = 4096;
/// Upper bound on `zc.chunk`: each method allocates a chunk-sized buffer before
/// `BEGIN` and the pipe of `splice` is a chunk, in a guest of a few hundred MiB
/// (a failed allocation would abort PID 1).
pub const MAX_CHUNK: usize = 16 << 20;

/// What the method suite runs: the `zc.methods` (or `zc.cards`), `zc.file`,
/// `zc.size` and `zc.chunk` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suite {
    /// The methods, in order (no repeats), on the one card; unused when `cards` is
    /// not empty.
    pub methods: Vec<Method>,
    /// `zc.cards`: one entry per card, in card order, each a NIC variant and the
    /// methods run through that card; empty for the one-card suite (`methods`).
    pub cards: Vec<SuiteCard>,
    /// The source file, relative to the disk root.
    pub file: String,
    /// Bytes each method sends, a prefix of the file; `None` for the whole file.
    pub size: Option<u64>,
    /// Bytes per chunk: a non-zero multiple of [`CHUNK_ALIGN`], at most [`MAX_CHUNK`].
    pub chunk: usize,
}

/// One card's share of a several-card suite (`zc.cards`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuiteCard {
    /// The NIC variant the card is (`sg-on`...), as spans and reports name it
    /// ([`valid_variant`]).
    pub variant: String,
    /// The methods run through the card, in order (no repeats).
    pub methods: Vec<Method>,
}

/// One method run of the suite: which method, through which card, under which
/// variant name (`None`: the one-card suite, plain spans).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodRun<'a> {
    /// The method.
    pub method: Method,
    /// The card it sends through.
    pub card: Card,
    /// The card's variant, which qualifies the span and the report.
    pub variant: Option<&'a str>,
}

impl MethodRun<'_> {
    /// The span's name: the method's, with `@<variant>` on a named card.
    pub fn span(&self) -> String {
        crate::marker::qualified_span(self.method.name(), self.variant)
    }

    /// The file a receive run writes in the scratch disk's root, which the host
    /// reads back after the run: `<method>.bin`, or `<method>.<variant>.bin` on a
    /// named card, so that the runs of several cards in one boot each have their
    /// own. Only letters, digits, `.`, `_` and `-` (a variant's name is no more).
    pub fn scratch_file(&self) -> String {
        match self.variant {
            Some(variant) => format!("{}.{variant}.bin", self.method.name()),
            None => format!("{}.bin", self.method.name()),
        }
    }
}

impl Default for Suite {
    fn default() -> Suite {
        Suite {
            methods: Method::ALL.to_vec(),
            cards: Vec::new(),
            file: DEFAULT_FILE.to_string(),
            size: None,
            chunk: DEFAULT_CHUNK,
        }
    }
}

impl Suite {
    /// Every method run, in order: `methods` on card 0, or each card's in turn.
    pub fn runs(&self) -> Vec<MethodRun<'_>> {
        if self.cards.is_empty() {
            let card = Card::new(0).expect("card 0 exists");
            return self
                .methods
                .iter()
                .map(|&method| MethodRun {
                    method,
                    card,
                    variant: None,
                })
                .collect();
        }
        self.cards
            .iter()
            .zip(0u8..)
            .flat_map(|(c, n)| {
                let card = Card::new(n).expect("zc.cards has at most MAX_CARDS entries");
                c.methods.iter().map(move |&method| MethodRun {
                    method,
                    card,
                    variant: Some(c.variant.as_str()),
                })
            })
            .collect()
    }

    /// How many cards the suite sends through.
    pub fn card_count(&self) -> usize {
        self.cards.len().max(1)
    }

    /// Whether any run is a receive method (which writes to the scratch disk).
    pub fn receives(&self) -> bool {
        self.runs()
            .iter()
            .any(|run| run.method.direction() == Direction::Receive)
    }
}

/// The prefix that marks our options among the kernel's own.
const PREFIX: &str = "zc.";

/// Every `zc.*` option of a command line, keyed without the `zc.` prefix.
///
/// A bare `zc.flag` (no `=`) has the empty value.
pub fn zc_options(cmdline: &str) -> BTreeMap<String, String> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|word| word.strip_prefix(PREFIX))
        .map(|option| {
            let (key, value) = option.split_once('=').unwrap_or((option, ""));
            (key.to_string(), value.to_string())
        })
        .collect()
}

/// Which program this `/init` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Inside `zc-vmm`: reports over the COM2 control channel.
    Guest,
    /// The emulated KVM host: mounts the host's root over 9p and runs a command in it.
    Host,
}

impl Role {
    /// The role a raw option map asks for, `Guest` when absent or invalid.
    ///
    /// Used to decide how to report a failure even when the options as a whole do
    /// not parse.
    pub fn lenient(options: &BTreeMap<String, String>) -> Role {
        match options.get("role").map(String::as_str) {
            Some("host") => Role::Host,
            _ => Role::Guest,
        }
    }
}

/// One step of `zc.test=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestHook {
    /// Make the guest kernel panic (via sysrq).
    Panic,
    /// Never exit: the VMM's timeout must fire.
    Hang,
    /// Write a file of a known pattern to the test disk, drop caches, read it back.
    DiskRoundtrip,
    /// Send `/mnt/<file>` to the peer with read+write; the name is relative to `/mnt`.
    Send(String),
    /// Read the whole disk device sequentially with O_DIRECT in 1 MiB requests.
    DiskRead,
    /// Run the method suite (`zc.methods`, `zc.file`, `zc.size`, `zc.chunk`).
    Methods,
    /// Copy `/mnt/<file>` to the scratch disk (same name, its root) with read+write,
    /// then fsync it (a virtio-blk FLUSH): what the host reads back from the image.
    ScratchCopy(String),
}

impl TestHook {
    /// Whether the step needs the test disk mounted on `/mnt`.
    pub fn needs_disk(&self) -> bool {
        matches!(
            self,
            TestHook::DiskRoundtrip
                | TestHook::Send(_)
                | TestHook::DiskRead
                | TestHook::Methods
                | TestHook::ScratchCopy(_)
        )
    }

    /// Whether the step needs the scratch disk mounted on `/scratch`.
    pub fn needs_scratch(&self) -> bool {
        matches!(self, TestHook::ScratchCopy(_))
    }

    /// Whether the step needs eth0 configured.
    pub fn needs_net(&self) -> bool {
        matches!(self, TestHook::Send(_) | TestHook::Methods)
    }
}

impl FromStr for TestHook {
    type Err = OptionsError;

    fn from_str(step: &str) -> Result<TestHook> {
        match step {
            "panic" => Ok(TestHook::Panic),
            "hang" => Ok(TestHook::Hang),
            "disk-roundtrip" => Ok(TestHook::DiskRoundtrip),
            "disk-read" => Ok(TestHook::DiskRead),
            "methods" => Ok(TestHook::Methods),
            _ => {
                if let Some(file) = step.strip_prefix("send:") {
                    check_disk_file(file, "zc.test=send:").map(|f| TestHook::Send(f.to_string()))
                } else if let Some(file) = step.strip_prefix("scratch-copy:") {
                    // The copy lands in the scratch disk's root, under the same name.
                    match check_disk_file(file, "zc.test=scratch-copy:")? {
                        f if f.contains('/') => Err(OptionsError::new(format!(
                            "zc.test=scratch-copy:{f}: expected a file in the test disk's root, e.g. scratch-copy:payload.bin"
                        ))),
                        f => Ok(TestHook::ScratchCopy(f.to_string())),
                    }
                } else {
                    Err(OptionsError::new(format!(
                        "zc.test: unknown step {step:?} (expected panic, hang, disk-roundtrip, disk-read, send:<file>, scratch-copy:<file> or methods, comma-separated)"
                    )))
                }
            }
        }
    }
}

/// Checks a file name on the test disk (`send:` or `zc.file`, named by `option`
/// in the error, e.g. `zc.file=`): relative to `/mnt` and staying inside it.
fn check_disk_file<'a>(file: &'a str, option: &str) -> Result<&'a str> {
    if file.is_empty()
        || file.starts_with('/')
        || file
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(OptionsError::new(format!(
            "{option}{file}: expected a file name relative to the test disk's root, e.g. {option}payload.bin"
        )));
    }
    Ok(file)
}

/// Parses `zc.methods`: `all` or a comma list of method names, no repeats (the
/// marks and reports are keyed by name, so a repeat would be ambiguous).
fn parse_methods(list: &str) -> Result<Vec<Method>> {
    parse_method_list(list, "zc.methods=", list)
}

/// Parses a method list (`all` or names) given as `option` + `whole` (for errors).
fn parse_method_list(list: &str, option: &str, whole: &str) -> Result<Vec<Method>> {
    if list == "all" {
        return Ok(Method::ALL.to_vec());
    }
    let mut methods = Vec::new();
    for name in list.split(',') {
        let method = Method::from_name(name).ok_or_else(|| {
            OptionsError::new(format!(
                "{option}{whole}: unknown method {name:?} (expected all, or a comma list of: {})",
                Method::names()
            ))
        })?;
        if methods.contains(&method) {
            return Err(OptionsError::new(format!(
                "{option}{whole}: {name} is listed twice"
            )));
        }
        methods.push(method);
    }
    Ok(methods)
}

/// Parses `zc.cards`: `VARIANT:METHODS` entries separated by `/`, at most
/// [`MAX_CARDS`], each variant named once.
fn parse_cards(text: &str) -> Result<Vec<SuiteCard>> {
    let bad = |why: &str| {
        OptionsError::new(format!(
            "zc.cards={text}: {why} (expected VARIANT:METHODS per card separated by /, e.g. zc.cards=sg-on:all/sg-off:sendfile)"
        ))
    };
    let mut cards: Vec<SuiteCard> = Vec::new();
    for entry in text.split('/') {
        let (variant, list) = entry
            .split_once(':')
            .ok_or_else(|| bad(&format!("{entry:?} has no ':'")))?;
        if !valid_variant(variant) {
            return Err(bad(&format!(
                "{variant:?} is not a variant name (1 to 32 letters, digits, - or _)"
            )));
        }
        if cards.iter().any(|c| c.variant == variant) {
            return Err(bad(&format!("{variant} is listed twice")));
        }
        let methods = parse_method_list(list, "zc.cards=", text)?;
        cards.push(SuiteCard {
            variant: variant.to_string(),
            methods,
        });
    }
    if cards.len() > usize::from(MAX_CARDS) {
        return Err(bad(&format!("{} cards, at most {MAX_CARDS}", cards.len())));
    }
    Ok(cards)
}

/// Parses `zc.size`: a byte count > 0.
fn parse_size(text: &str) -> Result<u64> {
    match text.parse::<u64>() {
        Ok(size) if size > 0 => Ok(size),
        _ => Err(OptionsError::new(format!(
            "zc.size={text}: expected a number of bytes > 0 (a prefix of zc.file; omit it for the whole file)"
        ))),
    }
}

/// Parses `zc.chunk`: a multiple of the page size, > 0 and at most [`MAX_CHUNK`].
fn parse_chunk(text: &str) -> Result<usize> {
    match text.parse::<usize>() {
        Ok(chunk) if chunk > 0 && chunk % CHUNK_ALIGN == 0 && chunk <= MAX_CHUNK => Ok(chunk),
        _ => Err(OptionsError::new(format!(
            "zc.chunk={text}: expected a multiple of {CHUNK_ALIGN} bytes, > 0 and at most {MAX_CHUNK}, e.g. zc.chunk=65536"
        ))),
    }
}

/// An IPv4 address with its prefix length (`10.0.2.15/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    /// The interface's address.
    pub addr: Ipv4Addr,
    /// The prefix length, 1..=32.
    pub prefix: u8,
}

impl Ipv4Net {
    /// The default guest address, QEMU's user-networking convention.
    pub const DEFAULT: Ipv4Net = Ipv4Net {
        addr: GUEST_IP,
        prefix: GUEST_PREFIX,
    };

    /// The netmask of the prefix (`/24` -> 255.255.255.0).
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(self.prefix)))
    }
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = OptionsError;

    fn from_str(text: &str) -> Result<Ipv4Net> {
        let bad = || {
            OptionsError::new(format!(
                "zc.ip={text}: expected an IPv4 address with a prefix length 1..=32, e.g. zc.ip=10.0.2.15/24"
            ))
        };
        let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(1..=32).contains(&prefix) {
            return Err(bad());
        }
        Ok(Ipv4Net { addr, prefix })
    }
}

/// The validated `zc.*` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `zc.role`.
    pub role: Role,
    /// `zc.test`: the steps, in order (empty when absent).
    pub tests: Vec<TestHook>,
    /// `zc.exit`, 0 when absent.
    pub exit_code: i32,
    /// `zc.outdir`: absolute, normalised without a trailing `/`; required for `Host`.
    pub outdir: Option<String>,
    /// `zc.ip`: eth0's address.
    pub ip: Ipv4Net,
    /// `zc.peer`: where `send` steps connect.
    pub peer: SocketAddrV4,
    /// `zc.disk=ro`: mount the test disk read-only.
    pub disk_read_only: bool,
    /// `zc.methods`, `zc.file`, `zc.size`, `zc.chunk`: what the `methods` step runs.
    pub suite: Suite,
    /// Keys of `zc.*` options this program does not know (warned about, not fatal,
    /// so that a newer VMM can pass options an older guest ignores).
    pub unknown: Vec<String>,
}

impl Options {
    /// Parses and validates the `zc.*` options of a kernel command line.
    pub fn parse(cmdline: &str) -> Result<Options> {
        Options::from_map(&zc_options(cmdline))
    }

    /// Validates an option map from [`zc_options`].
    pub fn from_map(map: &BTreeMap<String, String>) -> Result<Options> {
        let role = match map.get("role").map(String::as_str) {
            None | Some("guest") => Role::Guest,
            Some("host") => Role::Host,
            Some(other) => {
                return Err(OptionsError::new(format!(
                    "zc.role={other}: unknown role (expected zc.role=guest or zc.role=host)"
                )))
            }
        };
        let tests = match map.get("test") {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(str::parse)
                .collect::<Result<Vec<TestHook>>>()?,
        };
        let exit_code = match map.get("exit") {
            None => 0,
            Some(text) => match text.parse::<u8>() {
                Ok(code) => i32::from(code),
                Err(_) => {
                    return Err(OptionsError::new(format!(
                        "zc.exit={text}: not an exit status (expected a number 0..=255)"
                    )))
                }
            },
        };
        let outdir = map.get("outdir").map(|d| parse_outdir(d)).transpose()?;
        if role == Role::Host && outdir.is_none() {
            return Err(OptionsError::new(
                "zc.role=host needs zc.outdir=<absolute host path of the output directory>",
            ));
        }
        let ip = map
            .get("ip")
            .map_or(Ok(Ipv4Net::DEFAULT), |text| text.parse())?;
        let peer = match map.get("peer") {
            None => DEFAULT_PEER,
            Some(text) => text.parse().map_err(|_| {
                OptionsError::new(format!(
                    "zc.peer={text}: expected an IPv4 address and port, e.g. zc.peer=10.0.2.2:7878"
                ))
            })?,
        };
        let disk_read_only = match map.get("disk").map(String::as_str) {
            None | Some("rw") => false,
            Some("ro") => true,
            Some(other) => {
                return Err(OptionsError::new(format!(
                    "zc.disk={other}: expected zc.disk=rw or zc.disk=ro"
                )))
            }
        };
        let defaults = Suite::default();
        if map.contains_key("methods") && map.contains_key("cards") {
            return Err(OptionsError::new(
                "zc.methods and zc.cards both given: zc.cards names each card's methods; give one of them",
            ));
        }
        let suite = Suite {
            methods: map
                .get("methods")
                .map_or(Ok(defaults.methods), |list| parse_methods(list))?,
            cards: map
                .get("cards")
                .map_or(Ok(Vec::new()), |text| parse_cards(text))?,
            file: match map.get("file") {
                None => defaults.file,
                Some(file) => check_disk_file(file, "zc.file=")?.to_string(),
            },
            size: map.get("size").map(|text| parse_size(text)).transpose()?,
            chunk: map
                .get("chunk")
                .map_or(Ok(defaults.chunk), |text| parse_chunk(text))?,
        };
        let unknown = map
            .keys()
            .filter(|k| {
                !matches!(
                    k.as_str(),
                    "role"
                        | "test"
                        | "exit"
                        | "outdir"
                        | "ip"
                        | "peer"
                        | "disk"
                        | "methods"
                        | "cards"
                        | "file"
                        | "size"
                        | "chunk"
                )
            })
            .map(|k| format!("{PREFIX}{k}"))
            .collect();
        Ok(Options {
            role,
            tests,
            exit_code,
            outdir,
            ip,
            peer,
            disk_read_only,
            suite,
            unknown,
        })
    }
}

impl Default for Options {
    /// What an empty command line means: the guest role, no steps, the default
    /// addresses and suite.
    fn default() -> Options {
        Options {
            role: Role::Guest,
            tests: Vec::new(),
            exit_code: 0,
            outdir: None,
            ip: Ipv4Net::DEFAULT,
            peer: DEFAULT_PEER,
            disk_read_only: false,
            suite: Suite::default(),
            unknown: Vec::new(),
        }
    }
}

impl Options {
    /// The options as `zc.*` words for a kernel command line, space-separated,
    /// leaving out those at their default; [`Options::parse`] of the result gives
    /// the options back. Not written: `unknown` (it has no values), and what no
    /// command line can say (an empty step or method list).
    pub fn to_cmdline(&self) -> String {
        let defaults = Options::default();
        let mut words = Vec::new();
        if self.role != defaults.role {
            words.push(format!("{PREFIX}role={}", self.role));
        }
        if let Some(outdir) = &self.outdir {
            words.push(format!("{PREFIX}outdir={outdir}"));
        }
        if !self.tests.is_empty() {
            let steps: Vec<String> = self.tests.iter().map(TestHook::to_string).collect();
            words.push(format!("{PREFIX}test={}", steps.join(",")));
        }
        if self.disk_read_only {
            words.push(format!("{PREFIX}disk=ro"));
        }
        let suite = &self.suite;
        if !suite.cards.is_empty() {
            let cards: Vec<String> = suite
                .cards
                .iter()
                .map(|c| {
                    let names: Vec<&str> = c.methods.iter().map(|m| m.name()).collect();
                    format!("{}:{}", c.variant, names.join(","))
                })
                .collect();
            words.push(format!("{PREFIX}cards={}", cards.join("/")));
        } else if suite.methods != defaults.suite.methods && !suite.methods.is_empty() {
            let names: Vec<&str> = suite.methods.iter().map(|m| m.name()).collect();
            words.push(format!("{PREFIX}methods={}", names.join(",")));
        }
        if suite.file != defaults.suite.file {
            words.push(format!("{PREFIX}file={}", suite.file));
        }
        if let Some(size) = suite.size {
            words.push(format!("{PREFIX}size={size}"));
        }
        if suite.chunk != defaults.suite.chunk {
            words.push(format!("{PREFIX}chunk={}", suite.chunk));
        }
        if self.ip != defaults.ip {
            words.push(format!("{PREFIX}ip={}", self.ip));
        }
        if self.peer != defaults.peer {
            words.push(format!("{PREFIX}peer={}", self.peer));
        }
        if self.exit_code != defaults.exit_code {
            words.push(format!("{PREFIX}exit={}", self.exit_code));
        }
        words.join(" ")
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Guest => "guest",
            Role::Host => "host",
        })
    }
}

impl std::fmt::Display for TestHook {
    /// The step as `zc.test=` spells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TestHook::Panic => f.write_str("panic"),
            TestHook::Hang => f.write_str("hang"),
            TestHook::DiskRoundtrip => f.write_str("disk-roundtrip"),
            TestHook::DiskRead => f.write_str("disk-read"),
            TestHook::Methods => f.write_str("methods"),
            TestHook::Send(file) => write!(f, "send:{file}"),
            TestHook::ScratchCopy(file) => write!(f, "scratch-copy:{file}"),
        }
    }
}

/// Checks `zc.outdir`: it becomes a mount point under `/host`, so it must be an
/// absolute path below `/` without `.`/`..` tricks.
fn parse_outdir(dir: &str) -> Result<String> {
    let bad = |why: &str| Err(OptionsError::new(format!("zc.outdir={dir}: {why}")));
    if !dir.starts_with('/') {
        return bad("must be an absolute path");
    }
    if dir.split('/').any(|part| part == "." || part == "..") {
        return bad("must not contain . or .. components");
    }
    let trimmed = dir.trim_end_matches('/');
    if trimmed.is_empty() {
        // Mounting the writable share on /host itself would hide the host's root.
        return bad("must not be / (the writable share would hide the host's root)");
    }
    Ok(trimmed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN: &str = "BOOT_IMAGE=/vmlinuz console=ttyS0 panic=-1 quiet\n";

    #[test]
    fn defaults_without_zc_options() {
        let o = Options::parse(DEBIAN).unwrap();
        assert_eq!(o.role, Role::Guest);
        assert!(o.tests.is_empty());
        assert_eq!(o.exit_code, 0);
        assert_eq!(o.ip.to_string(), "10.0.2.15/24");
        assert_eq!(o.peer.to_string(), "10.0.2.2:7878");
        assert!(!o.disk_read_only);
        assert_eq!(o.outdir, None);
        assert!(o.unknown.is_empty());
        assert_eq!(o.suite.methods, Method::ALL);
        assert_eq!(o.suite.file, "payload.bin");
        assert_eq!(o.suite.size, None);
        assert_eq!(o.suite.chunk, 65536);
    }

    #[test]
    fn method_suite_options() {
        let o = Options::parse(
            "zc.test=methods zc.methods=sendfile,read_write,uring_send_zc zc.file=d/p.bin zc.size=1000000 zc.chunk=16384",
        )
        .unwrap();
        assert_eq!(o.tests, [TestHook::Methods]);
        assert!(TestHook::Methods.needs_disk() && TestHook::Methods.needs_net());
        assert_eq!(
            o.suite,
            Suite {
                methods: vec![Method::Sendfile, Method::ReadWrite, Method::UringSendZc],
                cards: Vec::new(),
                file: "d/p.bin".into(),
                size: Some(1_000_000),
                chunk: 16384,
            }
        );
        assert!(o.unknown.is_empty());
        assert_eq!(
            Options::parse("zc.methods=all").unwrap().suite.methods,
            Method::ALL
        );
        // Every name round-trips, in the contract's spelling.
        let all = Method::ALL.map(|m| m.name()).join(",");
        assert_eq!(
            Options::parse(&format!("zc.methods={all}"))
                .unwrap()
                .suite
                .methods,
            Method::ALL
        );
        assert_eq!(
            all,
            "read_write,mmap_write,sendfile,splice,direct_write,direct_zerocopy,mmap_zerocopy,uring_send_zc,cow_zerocopy,sendfile_warm,sendfile_tmpfs,sendfile_direct,splice_direct,vmsplice,zerocopy_pressure"
        );
    }

    #[test]
    fn a_suite_receives_when_any_card_runs_a_receive_method() {
        assert!(!Suite::default().receives());
        let named = Options::parse("zc.methods=sendfile,recv_mmap").unwrap();
        assert!(named.suite.receives());
        let cards = Options::parse("zc.cards=sg-on:sendfile/sg-off:tcp_zerocopy_receive").unwrap();
        assert!(cards.suite.receives());
        let sends = Options::parse("zc.cards=sg-on:all/sg-off:splice").unwrap();
        assert!(!sends.suite.receives());
    }

    #[test]
    fn method_suite_errors_are_one_helpful_line() {
        let err = Options::parse("zc.methods=sendfile,zerocopy")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown method \"zerocopy\""), "{err}");
        assert!(err.contains("read_write, mmap_write"), "{err}");
        let err = Options::parse("zc.methods=splice,splice")
            .unwrap_err()
            .to_string();
        assert!(err.contains("splice is listed twice"), "{err}");
        let err = Options::parse("zc.chunk=1000").unwrap_err().to_string();
        assert!(err.contains("multiple of 4096"), "{err}");
        for err in [
            Options::parse("zc.methods=sendfile,zerocopy"),
            Options::parse("zc.chunk=1000"),
        ] {
            assert!(!err.unwrap_err().to_string().contains('\n'));
        }
    }

    #[test]
    fn cards_give_each_variant_its_card_and_methods() {
        let o = Options::parse("zc.test=methods zc.cards=sg-on:all/sg-off:sendfile,mmap_zerocopy")
            .unwrap();
        assert_eq!(
            o.suite.cards,
            [
                SuiteCard {
                    variant: "sg-on".into(),
                    methods: Method::ALL.to_vec()
                },
                SuiteCard {
                    variant: "sg-off".into(),
                    methods: vec![Method::Sendfile, Method::MmapZerocopy]
                },
            ]
        );
        assert!(o.unknown.is_empty());
        assert_eq!(o.suite.card_count(), 2);
        let runs = o.suite.runs();
        assert_eq!(runs.len(), Method::ALL.len() + 2);
        // Card 0's methods first, then card 1's, each span named by its variant.
        assert_eq!(runs[0].card.index(), 0);
        assert_eq!(runs[0].span(), "read_write@sg-on");
        let last = runs.last().unwrap();
        assert_eq!(last.card.index(), 1);
        assert_eq!(last.card.peer().to_string(), "10.0.3.2:7878");
        assert_eq!(last.span(), "mmap_zerocopy@sg-off");
        // The same method on two cards is fine; the one-card suite is unqualified.
        assert!(Options::parse("zc.cards=a:sendfile/b:sendfile").is_ok());
        let plain = Options::parse("zc.methods=sendfile").unwrap().suite;
        assert_eq!(plain.card_count(), 1);
        assert_eq!(plain.runs()[0].span(), "sendfile");
        assert_eq!(plain.runs()[0].variant, None);
    }

    #[rstest::rstest]
    #[case::both("zc.methods=sendfile zc.cards=a:sendfile", "both given")]
    #[case::no_colon("zc.cards=sg-on", "has no ':'")]
    #[case::bad_variant("zc.cards=sg@on:all", "not a variant name")]
    #[case::empty_variant("zc.cards=:all", "not a variant name")]
    #[case::twice("zc.cards=a:all/a:sendfile", "a is listed twice")]
    #[case::method_twice("zc.cards=a:splice,splice", "splice is listed twice")]
    #[case::unknown("zc.cards=a:zerocopy", "unknown method")]
    #[case::empty_list("zc.cards=a:", "unknown method")]
    #[case::too_many(
        "zc.cards=a:all/b:all/c:all/d:all/e:all/f:all/g:all/h:all/i:all",
        "at most 8"
    )]
    fn bad_cards_are_one_line(#[case] line: &str, #[case] needle: &str) {
        let err = Options::parse(line).unwrap_err().to_string();
        assert!(err.contains(needle), "{line}: {err}");
        assert!(err.starts_with("zc."), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn value_keeps_everything_after_first_equals() {
        let map = zc_options("console=ttyS0 zc.x=a=b zc.flag");
        assert_eq!(map.get("x").map(String::as_str), Some("a=b"));
        assert_eq!(map.get("flag").map(String::as_str), Some(""));
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn repeated_key_last_wins() {
        let o = Options::parse("zc.exit=3 console=ttyS0 zc.exit=7").unwrap();
        assert_eq!(o.exit_code, 7);
    }

    #[test]
    fn ignores_non_zc_and_lookalikes() {
        let map = zc_options("zcx=1 xzc.role=host zc=2 role=host");
        assert!(map.is_empty());
    }

    #[test]
    fn guest_options() {
        let o = Options::parse("console=ttyS0 zc.role=guest zc.test=hang zc.exit=255").unwrap();
        assert_eq!(o.role, Role::Guest);
        assert_eq!(o.tests, [TestHook::Hang]);
        assert_eq!(o.exit_code, 255);
        assert_eq!(
            Options::parse("zc.test=panic").unwrap().tests,
            [TestHook::Panic]
        );
    }

    #[test]
    fn receive_runs_name_their_scratch_files_apart() {
        let o = Options::parse("zc.cards=sg-on:recv_write/sg-off:recv_write").unwrap();
        let files: Vec<String> = o.suite.runs().iter().map(MethodRun::scratch_file).collect();
        assert_eq!(files, ["recv_write.sg-on.bin", "recv_write.sg-off.bin"]);
        let plain = Options::parse("zc.methods=recv_mmap").unwrap();
        assert_eq!(plain.suite.runs()[0].scratch_file(), "recv_mmap.bin");
    }

    #[test]
    fn test_steps_in_order() {
        let o = Options::parse(
            "zc.test=disk-roundtrip,send:payload.bin,send:d/x.bin,disk-read,scratch-copy:payload.bin",
        )
            .unwrap();
        assert_eq!(
            o.tests,
            [
                TestHook::DiskRoundtrip,
                TestHook::Send("payload.bin".into()),
                TestHook::Send("d/x.bin".into()),
                TestHook::DiskRead,
                TestHook::ScratchCopy("payload.bin".into()),
            ]
        );
        assert!(o.tests.iter().all(TestHook::needs_disk));
        assert_eq!(o.tests.iter().filter(|t| t.needs_net()).count(), 2);
        assert_eq!(o.tests.iter().filter(|t| t.needs_scratch()).count(), 1);
        // Round trip through the VMM's side.
        let steps: Vec<String> = o.tests.iter().map(ToString::to_string).collect();
        assert_eq!(
            steps.last().map(String::as_str),
            Some("scratch-copy:payload.bin")
        );
        let err = Options::parse("zc.test=scratch-copy:d/x.bin").unwrap_err();
        assert!(err.to_string().contains("in the test disk's root"), "{err}");
        assert!(!TestHook::Hang.needs_disk() && !TestHook::Panic.needs_net());
    }

    #[test]
    fn network_and_disk_options() {
        let o = Options::parse("zc.ip=192.168.7.2/30 zc.peer=192.168.7.1:9000 zc.disk=ro").unwrap();
        assert_eq!(o.ip.addr, Ipv4Addr::new(192, 168, 7, 2));
        assert_eq!(o.ip.netmask(), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(o.peer, "192.168.7.1:9000".parse().unwrap());
        assert!(o.disk_read_only);
        assert!(o.unknown.is_empty());
        assert_eq!(Ipv4Net::DEFAULT.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        let host32: Ipv4Net = "10.1.1.1/32".parse().unwrap();
        assert_eq!(host32.netmask(), Ipv4Addr::BROADCAST);
        assert!(!Options::parse("zc.disk=rw").unwrap().disk_read_only);
    }

    #[test]
    fn host_options() {
        let o = Options::parse("zc.role=host zc.outdir=/tmp/out/ zc.future=1").unwrap();
        assert_eq!(o.role, Role::Host);
        assert_eq!(o.outdir.as_deref(), Some("/tmp/out"));
        assert_eq!(o.unknown, vec!["zc.future".to_string()]);
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            "zc.role=hots",
            "zc.test=crash",
            "zc.exit=",
            "zc.exit=256",
            "zc.exit=-1",
            "zc.exit=x",
            "zc.role=host",
            "zc.role=host zc.outdir=rel/dir",
            "zc.role=host zc.outdir=/",
            "zc.role=host zc.outdir=/a/../etc",
            "zc.test=",
            "zc.test=disk-roundtrip,",
            "zc.test=send:",
            "zc.test=send:/etc/passwd",
            "zc.test=send:../x",
            "zc.test=send:a//b",
            "zc.ip=10.0.2.15",
            "zc.ip=10.0.2.15/0",
            "zc.ip=10.0.2.15/33",
            "zc.ip=10.0.2/24",
            "zc.peer=10.0.2.2",
            "zc.peer=10.0.2.2:99999",
            "zc.peer=host:7878",
            "zc.disk=yes",
            "zc.test=method",
            "zc.methods=",
            "zc.methods=ALL",
            "zc.methods=sendfile,",
            "zc.methods=,sendfile",
            "zc.methods=send_file",
            "zc.methods=all,sendfile",
            "zc.methods=sendfile,sendfile",
            "zc.file=",
            "zc.file=/mnt/payload.bin",
            "zc.file=../payload.bin",
            "zc.size=0",
            "zc.size=-1",
            "zc.size=1M",
            "zc.size=",
            "zc.chunk=0",
            "zc.chunk=4095",
            "zc.chunk=6000",
            "zc.chunk=2147483648",
            "zc.chunk=16781312",
            "zc.chunk=64k",
        ] {
            let err = Options::parse(bad).expect_err(bad);
            assert!(err.to_string().starts_with("zc."), "{bad}: {err}");
        }
    }

    #[test]
    fn to_cmdline_then_parse_gives_the_options_back() {
        assert_eq!(Options::default().to_cmdline(), "");
        assert_eq!(Options::parse("").unwrap(), Options::default());
        let methods_run = Options {
            tests: vec![TestHook::Methods],
            disk_read_only: true,
            suite: Suite {
                methods: vec![Method::Sendfile, Method::ReadWrite],
                size: Some(1 << 20),
                chunk: 16384,
                ..Suite::default()
            },
            ..Options::default()
        };
        assert_eq!(
            methods_run.to_cmdline(),
            "zc.test=methods zc.disk=ro zc.methods=sendfile,read_write zc.size=1048576 zc.chunk=16384"
        );
        let cases = [
            Options::default(),
            methods_run,
            Options {
                role: Role::Host,
                outdir: Some("/tmp/zc out".replace(' ', "-")),
                ..Options::default()
            },
            Options {
                tests: vec![
                    TestHook::DiskRoundtrip,
                    TestHook::Send("d/x.bin".into()),
                    TestHook::DiskRead,
                    TestHook::Panic,
                    TestHook::Hang,
                ],
                exit_code: 255,
                ip: "192.168.7.2/30".parse().unwrap(),
                peer: "192.168.7.1:9000".parse().unwrap(),
                suite: Suite {
                    methods: Method::ALL.into_iter().rev().collect(),
                    cards: Vec::new(),
                    file: "a/b.bin".into(),
                    size: Some(1),
                    chunk: MAX_CHUNK,
                },
                ..Options::default()
            },
        ];
        let two_cards = Options {
            tests: vec![TestHook::Methods],
            suite: Suite {
                cards: vec![
                    SuiteCard {
                        variant: "sg-on".into(),
                        methods: vec![Method::Splice, Method::ReadWrite],
                    },
                    SuiteCard {
                        variant: "sg-off".into(),
                        methods: Method::ALL.to_vec(),
                    },
                ],
                ..Suite::default()
            },
            ..Options::default()
        };
        assert_eq!(
            two_cards.to_cmdline(),
            format!(
                "zc.test=methods zc.cards=sg-on:splice,read_write/sg-off:{}",
                Method::ALL.map(|m| m.name()).join(",")
            )
        );
        for options in cases.into_iter().chain([two_cards]) {
            let line = options.to_cmdline();
            assert_eq!(Options::parse(&line).as_ref(), Ok(&options), "{line}");
        }
        for method in Method::ALL {
            let one = Options {
                suite: Suite {
                    methods: vec![method],
                    ..Suite::default()
                },
                ..Options::default()
            };
            assert_eq!(Options::parse(&one.to_cmdline()), Ok(one));
        }
    }

    #[test]
    fn lenient_role() {
        assert_eq!(
            Role::lenient(&zc_options("zc.role=host zc.exit=x")),
            Role::Host
        );
        assert_eq!(Role::lenient(&zc_options("zc.role=bogus")), Role::Guest);
        assert_eq!(Role::lenient(&zc_options("")), Role::Guest);
    }
}
