// A time-series plot (uPlot): `t_ms` on the x axis, one line per series.
import { useEffect, useRef } from 'preact/hooks';
import uPlot from 'uplot';
import 'uplot/dist/uPlot.min.css';

const COLOURS = ['#2563eb', '#dc2626', '#059669', '#d97706', '#7c3aed', '#0891b2'];

/**
 * `series` is [{ label, values, dash?, dots? }] (`dots` marks each value, for gappy series); `unit` labels the y axis. The plot follows its
 * container's width; a table of the last values is there for those who cannot see it.
 */
export function Chart({ title, unit, t_ms, series, id }) {
  const box = useRef(null);
  const plot = useRef(null);
  const data = [t_ms.map((t) => t / 1000), ...series.map((s) => s.values)];
  const shape = series.map((s) => s.label).join('|');

  useEffect(() => {
    const el = box.current;
    const width = () => Math.max(240, el.clientWidth);
    const options = {
      width: width(),
      height: 180,
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true } },
      axes: [
        { stroke: 'currentColor', grid: { stroke: 'rgba(128,128,128,0.2)' } },
        { stroke: 'currentColor', label: unit, size: 56, grid: { stroke: 'rgba(128,128,128,0.2)' } },
      ],
      series: [
        {},
        ...series.map((s, i) => ({
          label: s.label,
          stroke: COLOURS[i % COLOURS.length],
          width: 2,
          dash: s.dash,
          spanGaps: false,
          // Percentiles have gaps where nothing was served: a lone value shows as a dot.
          points: { show: !!s.dots, size: 5, fill: COLOURS[i % COLOURS.length] },
        })),
      ],
    };
    plot.current = new uPlot(options, data, el);
    const observer = new ResizeObserver(() => plot.current.setSize({ width: width(), height: 180 }));
    observer.observe(el);
    return () => {
      observer.disconnect();
      plot.current.destroy();
      plot.current = null;
    };
  }, [shape, unit]);

  useEffect(() => {
    if (plot.current) plot.current.setData(data);
  });

  const last = (values) => {
    for (let i = values.length - 1; i >= 0; i--) if (values[i] != null) return values[i];
    return null;
  };
  return (
    <figure class="chart" id={id} aria-labelledby={`${id}-title`}>
      <figcaption id={`${id}-title`}>{title}</figcaption>
      <div ref={box} class="plot" aria-hidden="true" />
      <div class="visually-hidden">
      <table>
        <caption>{title}: latest and highest values</caption>
        <tbody>
          {series.map((s) => {
            const peak = Math.max(0, ...s.values.filter((v) => v != null));
            return (
              <tr key={s.label} data-peak={peak}>
                <th scope="row">{s.label}</th>
                <td>{last(s.values) ?? '–'} {unit}</td>
                <td>highest {peak} {unit}</td>
              </tr>
            );
          })}
        </tbody>
      </table>
      </div>
    </figure>
  );
}
