/**
 * How amounts read in the UI: money, durations, percentages, a sparkline.
 *
 * The same rules as `cloudgpu/_format.py`, so the magic, the kernel and the UI agree;
 * `liveMoney` shows sub-dollar amounts to the hundredth of a cent, so a running cost
 * visibly ticks.
 */

/** `$2.50`; `$0.0012` for fractions of a cent; `<$0.0001` below that. */
export function money(dollars: number): string {
  if (dollars >= 0.01 || dollars === 0) {
    return `$${dollars.toFixed(2)}`;
  }
  return dollars >= 0.0001 ? `$${dollars.toFixed(4)}` : '<$0.0001';
}

/** A running cost: `$0.0123` below a dollar (it moves every few seconds), else `$2.50`. */
export function liveMoney(dollars: number): string {
  if (dollars === 0) {
    return '$0.00';
  }
  if (dollars < 0.0001) {
    return '<$0.0001';
  }
  return dollars < 1 ? `$${dollars.toFixed(4)}` : `$${dollars.toFixed(2)}`;
}

/** A rate: `$3.95/h`; `free` for zero. */
export function rate(perHour: number): string {
  return perHour ? `${money(perHour)}/h` : 'free';
}

/** An exact uptime: `42 s`, `3 min 07 s`, `2 h 05 min`. */
export function uptime(seconds: number): string {
  const total = Math.max(Math.floor(seconds), 0);
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const secs = total % 60;
  if (hours) {
    return `${hours} h ${String(minutes).padStart(2, '0')} min`;
  }
  return minutes ? `${minutes} min ${String(secs).padStart(2, '0')} s` : `${secs} s`;
}

/** `45%`; `–` when there is no reading. */
export function percent(value: number | null | undefined): string {
  return value === null || value === undefined || Number.isNaN(value)
    ? '–'
    : `${Math.round(value)}%`;
}

/** `12.3 / 80 GB`; `–` without a reading. */
export function memory(usedGb: number | null | undefined, totalGb: number): string {
  if (usedGb === null || usedGb === undefined) {
    return '–';
  }
  const used = usedGb < 10 ? usedGb.toFixed(2) : usedGb.toFixed(1);
  return totalGb ? `${used} / ${Math.round(totalGb)} GB` : `${used} GB`;
}

/**
 * The `points` of an SVG polyline drawing `values` (0-100) in a `width` x `height` box,
 * newest on the right; empty for no values.
 */
export function sparkline(values: number[], width: number, height: number): string {
  if (!values.length) {
    return '';
  }
  const step = values.length > 1 ? width / (values.length - 1) : 0;
  return values
    .map((v, i) => {
      const clamped = Math.min(Math.max(v, 0), 100);
      const x = values.length > 1 ? i * step : width;
      const y = height - (clamped / 100) * height;
      return `${round(x)},${round(y)}`;
    })
    .join(' ');
}

function round(n: number): number {
  return Math.round(n * 10) / 10;
}
