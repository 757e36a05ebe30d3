//! Assigns one image to its prototypes on a Cortex-M4F with core's quantized inference and
//! prints the result through semihosting (run it under QEMU's mps2-an386: scripts/firmware.sh).
//!
//! The model and the image are built in (`include_bytes!`, paths from the build); the scratch
//! buffers are statics sized at build time from the model header, so RAM use is fixed and the
//! linker checks it against memory.x. No allocator.
//!
//! Besides the assignment it reports what the assignment costs: SysTick ticks of the core clock
//! (QEMU with `-icount shift=0` runs one instruction per nanosecond of virtual time and clocks
//! SysTick at 25 MHz, so one tick is 40 instructions; a loop of known length is timed too, to
//! check that ratio) and the stack high-water mark, measured by painting the free RAM between
//! .bss and the stack before the run.
#![no_std]
#![no_main]

use core::panic::PanicInfo;
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::{entry, exception};
use cortex_m_semihosting::{debug, hprintln};
use dinovmf_core::quant::infer::{forward, top_n, NoObserver, Scratch};
use dinovmf_core::quant::Model;

include!(concat!(env!("OUT_DIR"), "/sizes.rs"));

static mut FLOATS: [f32; SCRATCH_FLOATS] = [0.0; SCRATCH_FLOATS];
static mut BYTES: [i8; SCRATCH_BYTES] = [0; SCRATCH_BYTES];

/// SysTick wrap-arounds (the counter is 24 bits).
static WRAPS: AtomicU32 = AtomicU32::new(0);
const RELOAD: u32 = 0x00ff_ffff;
const PAINT: u32 = 0xa5a5_a5a5;

extern "C" {
    static mut __ebss: u32;
    static _stack_start: u32;
}

#[exception]
fn SysTick() {
    WRAPS.fetch_add(1, Ordering::Relaxed);
}

fn ticks() -> u64 {
    loop {
        let w = WRAPS.load(Ordering::Relaxed);
        let cur = cortex_m::peripheral::SYST::get_current();
        // A wrap between the two loads runs the SysTick handler at once: read again.
        if WRAPS.load(Ordering::Relaxed) == w {
            return w as u64 * (RELOAD as u64 + 1) + (RELOAD - cur) as u64;
        }
    }
}

/// FNV-1a over the little-endian bytes of `v` (the host test computes the same).
fn hash_f32s(v: &[f32]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for x in v {
        for b in x.to_le_bytes() {
            h ^= b as u32;
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

fn fail(msg: &dyn core::fmt::Display) -> ! {
    hprintln!("error: {}", msg);
    debug::exit(debug::EXIT_FAILURE);
    loop {}
}

/// Fills the free RAM between the end of .bss and (a margin below) the current stack pointer.
fn paint_stack() {
    let sp = cortex_m::register::msp::read() as usize;
    let mut p = addr_of_mut!(__ebss) as usize;
    while p + 256 < sp {
        // SAFETY: the words between the end of .bss and the live stack are unused RAM.
        unsafe { (p as *mut u32).write_volatile(PAINT) };
        p += 4;
    }
}

/// Deepest stack use so far, in bytes (the first painted word that changed, from below).
fn stack_high_water() -> usize {
    let top = addr_of!(_stack_start) as usize;
    let mut p = addr_of!(__ebss) as usize;
    // SAFETY: reads RAM between .bss and the stack top.
    while p < top && unsafe { (p as *const u32).read_volatile() } == PAINT {
        p += 4;
    }
    top - p
}

const CALIB_ITERS: u32 = 1_000_000;

fn spin(n: u32) {
    // SAFETY: a register-only count-down loop.
    unsafe {
        core::arch::asm!("1:", "subs {0}, #1", "bne 1b", inout(reg) n => _, options(nomem, nostack));
    }
}

#[entry]
fn main() -> ! {
    paint_stack();
    let mut cp = cortex_m::Peripherals::take().unwrap_or_else(|| fail(&"peripherals taken"));
    let syst = &mut cp.SYST;
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(RELOAD);
    syst.clear_current();
    syst.enable_interrupt();
    syst.enable_counter();
    // The counter reads 0 until its first reload.
    while cortex_m::peripheral::SYST::get_current() == 0 {}

    // Ticks of a loop of known length: 2 instructions (subs, bne) per iteration.
    let c0 = ticks();
    spin(CALIB_ITERS);
    let calib = ticks() - c0;

    let t0 = ticks();
    let model = Model::parse(MODEL).unwrap_or_else(|e| fail(&e));
    let t1 = ticks();
    // SAFETY: main runs once and is the only user of the scratch statics.
    let scratch = unsafe {
        Scratch {
            floats: &mut *addr_of_mut!(FLOATS),
            bytes: &mut *addr_of_mut!(BYTES),
        }
    };
    let out = forward(&model, IMAGE, scratch, &mut NoObserver).unwrap_or_else(|e| fail(&e));
    let t2 = ticks();
    let top = top_n::<5>(out.probs);
    let h = hash_f32s(out.feature);
    hprintln!("model_bytes {}", MODEL.len());
    hprintln!("scratch {} floats {} bytes", SCRATCH_FLOATS, SCRATCH_BYTES);
    for (r, a) in top.iter().enumerate() {
        hprintln!(
            "top {} prototype {} prob {:08x} {:.6}",
            r,
            a.prototype,
            a.prob.to_bits(),
            a.prob
        );
    }
    hprintln!("feature_hash {:08x}", h);
    hprintln!("calib_ticks {} for {} instructions", calib, 2 * CALIB_ITERS);
    hprintln!("parse_ticks {}", t1 - t0);
    hprintln!("assign_ticks {}", t2 - t1);
    hprintln!("stack_bytes {}", stack_high_water());
    hprintln!("done");
    debug::exit(debug::EXIT_SUCCESS);
    loop {}
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    hprintln!("panic: {}", info);
    debug::exit(debug::EXIT_FAILURE);
    loop {}
}
