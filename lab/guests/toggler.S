# toggler.S - a 512-byte boot sector whose vCPU 0 alternates BUSY and HALTED
# phases and announces each phase on COM1, so tests have ground truth.
#
# Timing: we reprogram PIT channel 0 to 100 Hz (divisor 11932, 10.0001 ms) and
# count ticks in our own IRQ0 handler. The BIOS tick counter at 0040:006C is
# NOT used: it would count at 18.2 Hz only while the BIOS handler owns IRQ0,
# and its 55 ms granularity is too coarse for sub-second phases.
#
# Lost ticks: when the host is overloaded (more busy vCPUs than cores) a vCPU
# thread can miss a whole tick; the PIC latches only one pending IRQ0, so a
# plain "incw ticks" would lose it and stretch the phase. The handler therefore
# counts PIT periods elapsed on the ACPI PM timer (port 0x608 on QEMU's PIIX4,
# 3.579545 MHz, 24 bits, same virtual clock as the PIT; one PIT period is 35796
# PM clocks) and adds that many ticks. The remainder starts at half a period,
# so a handler running up to 5 ms late still counts exactly one tick, and the
# tick grid (hence phase boundaries) stays that of the PIT.
#
# Phases: each phase lasts exactly BUSY_TICKS / HALT_TICKS ticks, measured from
# the previous phase boundary (not from "now"), so phases never drift. The
# marker byte ('B' or 'H') is written to COM1 right after the tick that ends the
# previous phase, so the marker's arrival time is the phase boundary.
#
# BUSY: spin with interrupts enabled, re-reading the tick counter.
# HALTED: `sti; hlt` until enough ticks passed; the vCPU wakes only for IRQ0
# (100 times a second, a few instructions each) because every other PIC line
# is masked.
#
# Other vCPUs (APs, hot-plugged or not) are never started by us: SeaBIOS leaves
# them parked, so they accumulate no run time.
#
# Build: as --32 --defsym BUSY_TICKS=n --defsym HALT_TICKS=m toggler.S
#        ld -m elf_i386 -Ttext 0x7c00 --oformat binary
# The two tick counts are also stored after the "TOGL" magic at PARAMS_OFFSET
# (see lab/guest.py) so a built image can be checked without running it.

        .code16
        .text
        .globl _start

        .set COM1, 0x3f8
        .set PIT_DIVISOR, 11932         # 1193182 Hz / 11932 = 100.0 Hz
        .set PM_TMR, 0x608              # ACPI PM timer (PIIX4 PMBASE 0x600 + 8)
        .set PIT_PERIOD_PM, 35796       # 11932 PIT clocks * 3 = PM clocks per tick

_start:
        cli
        ljmp    $0, $normalize          # SeaBIOS uses 0000:7C00, but be sure
normalize:
        xorw    %ax, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    $0x7c00, %sp

        # Own IRQ0 (vector 8 under the BIOS PIC mapping): IVT entry at 0x20.
        movw    $irq0, 0x20
        movw    %ax, 0x22

        # PIT channel 0: lobyte/hibyte, mode 2 (rate generator), binary.
        movb    $0x34, %al
        outb    %al, $0x43
        movb    $(PIT_DIVISOR & 0xff), %al
        outb    %al, $0x40
        movb    $(PIT_DIVISOR >> 8), %al
        outb    %al, $0x40
        movw    $PM_TMR, %dx            # reference point of the tick grid
        inl     %dx, %eax
        movl    %eax, pm_last

        # Mask every PIC line but IRQ0, so nothing else wakes the halted vCPU.
        movb    $0xfe, %al
        outb    %al, $0x21
        movb    $0xff, %al
        outb    %al, $0xa1
        sti

        # Align the first phase to a tick boundary.
        movw    ticks, %bx
1:      cmpw    ticks, %bx
        je      1b
        movw    ticks, %bx              # bx = tick at which the phase began

phase_busy:
        movb    $'B', %al
        call    putc
busy_loop:
        movw    ticks, %ax
        subw    %bx, %ax                # wrap-safe elapsed ticks
        cmpw    busy_ticks, %ax
        jb      busy_loop
        addw    busy_ticks, %bx         # next boundary from the last one: no drift

        movb    $'H', %al
        call    putc
halt_loop:
        sti                             # sti's shadow: hlt runs before any IRQ
        hlt
        movw    ticks, %ax
        subw    %bx, %ax
        cmpw    halt_ticks, %ax
        jb      halt_loop
        addw    halt_ticks, %bx
        jmp     phase_busy

# putc: write %al to COM1 once the transmit holding register is empty.
putc:
        pushw   %ax
        movw    $(COM1 + 5), %dx        # line status register
2:      inb     %dx, %al
        testb   $0x20, %al
        jz      2b
        popw    %ax
        movw    $COM1, %dx
        outb    %al, %dx
        ret

irq0:
        pushl   %eax
        pushl   %edx
        movw    $PM_TMR, %dx
        inl     %dx, %eax
        movl    %eax, %edx
        subl    %cs:pm_last, %eax
        movl    %edx, %cs:pm_last
        andl    $0xffffff, %eax         # the PM timer is 24 bits wide: wraps at 4.7 s
        addl    %eax, %cs:pm_rem
3:      cmpl    $PIT_PERIOD_PM, %cs:pm_rem
        jb      4f
        subl    $PIT_PERIOD_PM, %cs:pm_rem
        incw    %cs:ticks               # a word write: atomic for the readers
        jmp     3b
4:      movb    $0x20, %al              # non-specific EOI to the master PIC
        outb    %al, $0x20
        popl    %edx
        popl    %eax
        iret

ticks:
        .word   0
        .balign 4
pm_last:
        .long   0
pm_rem:
        .long   PIT_PERIOD_PM / 2

        # Parameters, at a fixed offset so lab/guest.py can verify an image.
        .org    0x1f0
        .ascii  "TOGL"
busy_ticks:
        .word   BUSY_TICKS
halt_ticks:
        .word   HALT_TICKS

        .org    0x1fe
        .byte   0x55, 0xaa
