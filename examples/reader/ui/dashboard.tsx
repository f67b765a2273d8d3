import { useState } from 'react';

type Item = {
  id: number; n: number; kind: string; title: string; url: string; summary: string;
  tags: string[]; score: number; reason: string; verdict: number;
};
type Props = { day: string; items: Item[]; likes: string[]; dislikes: string[] };

// Lua sends an empty list as {}: read every list defensively.
const list = <T,>(x: unknown): T[] => (Array.isArray(x) ? (x as T[]) : []);

// The reader's daily dashboard: the day's picks, best first, each with 👍 / 👎.
// A verdict goes to reader_feedback (stored, attached to the ranking's generation, and used to
// update the preference notes for tomorrow).
export default function Reader(props: Props) {
  const day = props.day;
  const items = list<Item>(props.items);
  const likes = list<string>(props.likes);
  const dislikes = list<string>(props.dislikes);
  const [verdicts, setVerdicts] = useState<Record<number, number>>({});
  const [error, setError] = useState('');
  const rate = async (id: number, verdict: number) => {
    try {
      await ichi.call('reader_feedback', { item: id, verdict });
      setVerdicts((v) => ({ ...v, [id]: verdict }));
      setError('');
    } catch (e) {
      setError(String((e as Error)?.message ?? e));
    }
  };
  return (
    <div className="max-w-2xl mx-auto p-4 font-sans">
      <h1 id="reader-day" className="text-2xl font-bold mb-1">Your reading for {day}</h1>
      <p className="text-sm text-gray-500 mb-4">
        Leaning towards: <span id="reader-likes">{likes.join(', ') || '—'}</span>
        {dislikes.length > 0 ? <span> · avoiding: <span id="reader-dislikes">{dislikes.join(', ')}</span></span> : null}
      </p>
      {error ? <p id="reader-error" className="text-red-600 mb-2">{error}</p> : null}
      <ol id="reader-items" className="space-y-3">
        {items.map((it) => {
          const v = verdicts[it.id] ?? it.verdict;
          return (
            <li key={it.id} data-item={it.id} data-verdict={v} className="rounded border border-gray-200 p-3">
              <div className="flex items-start gap-2">
                <span className="text-gray-400 w-6">{it.n}.</span>
                <div className="flex-1">
                  {it.url.startsWith('mid:')
                    ? <span className="font-semibold">{it.title}</span>
                    : <a className="font-semibold text-blue-700 hover:underline" href={it.url} target="_blank" rel="noreferrer">{it.title}</a>}
                  <p className="text-sm text-gray-600">{it.reason}</p>
                  <p className="text-xs text-gray-400">{list<string>(it.tags).join(' · ')}</p>
                </div>
                <button id={`like-${it.id}`} onClick={() => rate(it.id, 1)}
                  className={`px-2 py-1 rounded ${v === 1 ? 'bg-green-600 text-white' : 'bg-gray-100'}`}>👍</button>
                <button id={`dislike-${it.id}`} onClick={() => rate(it.id, -1)}
                  className={`px-2 py-1 rounded ${v === -1 ? 'bg-red-600 text-white' : 'bg-gray-100'}`}>👎</button>
              </div>
            </li>
          );
        })}
      </ol>
    </div>
  );
}
