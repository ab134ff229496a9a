import { liveMoney, memory, money, percent, rate, sparkline, uptime } from '../format';

describe('money', () => {
  it('reads as cloudgpu/_format.py money does', () => {
    expect(money(2.5)).toBe('$2.50');
    expect(money(0)).toBe('$0.00');
    expect(money(0.0012)).toBe('$0.0012');
    expect(money(0.00001)).toBe('<$0.0001');
  });

  it('shows a running cost below a dollar to the hundredth of a cent', () => {
    expect(liveMoney(0.0123)).toBe('$0.0123');
    expect(liveMoney(3.456)).toBe('$3.46');
    expect(liveMoney(0)).toBe('$0.00');
    expect(liveMoney(0.00002)).toBe('<$0.0001');
  });

  it('writes rates per hour', () => {
    expect(rate(3.95)).toBe('$3.95/h');
    expect(rate(0)).toBe('free');
  });
});

describe('durations and readings', () => {
  it('reads uptimes as %cloudgpu status does', () => {
    expect(uptime(42.9)).toBe('42 s');
    expect(uptime(187)).toBe('3 min 07 s');
    expect(uptime(7500)).toBe('2 h 05 min');
    expect(uptime(-3)).toBe('0 s');
  });

  it('shows a missing reading as a dash, not zero', () => {
    expect(percent(null)).toBe('–');
    expect(percent(44.6)).toBe('45%');
    expect(memory(null, 80)).toBe('–');
    expect(memory(1.234, 80)).toBe('1.23 / 80 GB');
    expect(memory(12.34, 0)).toBe('12.3 GB');
  });
});

describe('sparkline', () => {
  it('maps 0-100 onto the box, newest on the right, clamped', () => {
    expect(sparkline([], 100, 20)).toBe('');
    expect(sparkline([0, 50, 100], 100, 20)).toBe('0,20 50,10 100,0');
    expect(sparkline([150, -5], 10, 10)).toBe('0,0 10,10');
    expect(sparkline([25], 100, 20)).toBe('100,15');
  });
});
